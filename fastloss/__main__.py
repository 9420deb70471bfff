"""``python -m fastloss bench | check | demo``.

    bench   time fwd+bwd of every loss family (pointwise, cross-entropy / focal, contrastive /
            triplet / InfoNCE): fastloss vs torch.nn eager vs torch.compile, interleaved (see
            --help); ``bench --sweep``: fwd+bwd time against size, fastloss vs torch.nn
    check   run every loss once on this device against torch.nn (or the naive formula where torch.nn
            lacks the loss), print OK / FAIL and which implementation ran (kernels or PyTorch
            path); exit status 1 when any loss disagrees
    demo    train small models on synthetic data with fastloss and torch.nn losses (see --help)
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
        description="Median time, speed-up, peak memory and share of copy bandwidth of the forward "
                    "and backward of every loss family (pointwise, cross-entropy and focal, contrastive, "
                    "triplet and InfoNCE) for fastloss, torch.nn eager and torch.compile (and Liger-Kernel's "
                    "cross-entropy when installed), timed in interleaved rounds; each ratio is the other's "
                    "time over fastloss's (> 1: fastloss faster), marked '?' when too noisy to read. "
                    "--sweep: fwd+bwd time against size, fastloss vs torch.nn, per loss.",
    )
    _bench.add_bench_arguments(bench)
    check = sub.add_parser(
        "check", help="run every loss once against torch.nn or its naive formula; print OK / FAIL",
        description="Every loss (pointwise, cross-entropy with its options, focal, contrastive, triplet, "
                    "InfoNCE, CombinedLoss, RegularizedLoss) once in float32 on this device: loss and "
                    "gradients against torch.nn, or the naive formula where torch.nn lacks the loss. Each "
                    "line names the implementation that ran (the Triton kernels launched, or the PyTorch "
                    "path). Exit status 1 when any loss disagrees or fails.",
    )
    _bench.add_check_arguments(check)
    from fastloss import _demo

    demo = sub.add_parser(
        "demo", help="train small models with fastloss and torch.nn losses and compare",
        description="Regression with outliers (MSE vs Huber), imbalanced classification (cross-entropy "
                    "vs focal), binary classification (BCE) and a siamese embedding (contrastive), each "
                    "with the fastloss loss and its torch.nn counterpart from the same initial weights.",
    )
    _demo.add_demo_arguments(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from fastloss import _demo

        return _demo.demo_main(args)
    from fastloss import _bench

    if args.command == "bench":
        return _bench.bench_main(args)
    return _bench.check_main(args)


if __name__ == "__main__":
    sys.exit(main())
