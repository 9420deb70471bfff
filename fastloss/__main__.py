"""``python -m fastloss bench | check | demo`` (the code is fastloss.cli).

    bench   time fwd+bwd of every loss (pointwise, softmax, embedding, linear cross-entropy):
            fastloss vs torch.nn eager vs torch.compile, interleaved (see --help); ``bench --sweep``:
            fwd+bwd time against size, fastloss vs torch.nn, and the crossover size per family
    check   run every loss once on this device against torch.nn (or the naive formula where torch.nn
            lacks the loss), print OK / FAIL and which implementation ran (kernels or PyTorch
            path); exit status 1 when any loss disagrees
    demo    train small models on synthetic data with fastloss and torch.nn losses (see --help)
"""

from __future__ import annotations

import sys

from fastloss.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
