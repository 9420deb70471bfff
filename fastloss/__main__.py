"""``python -m fastloss bench | check | demo``.

    bench   time fwd+bwd of every loss: fastloss vs torch.nn eager vs torch.compile (see --help)
    check   run each loss once on this device against torch.nn and print OK / FAIL
    demo    not implemented yet
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from fastloss import _bench

    parser = argparse.ArgumentParser(prog="python -m fastloss", description="fastloss command line: bench, check, demo.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,check,demo}")
    bench = sub.add_parser(
        "bench", help="benchmark fastloss against torch.nn eager and torch.compile",
        description="Median time, speed-up, peak memory and share of copy bandwidth of "
                    "loss(x, y).backward() for fastloss, torch.nn eager and torch.compile.",
    )
    _bench.add_bench_arguments(bench)
    check = sub.add_parser("check", help="run each loss once against torch.nn; print OK / FAIL")
    _bench.add_check_arguments(check)
    sub.add_parser("demo", help="(not implemented yet)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        print("python -m fastloss demo: not implemented yet", file=sys.stderr)
        return 2
    from fastloss import _bench

    if args.command == "bench":
        return _bench.bench_main(args)
    return _bench.check_main(args)


if __name__ == "__main__":
    sys.exit(main())
