"""The command line's measuring and checking code: ``python -m fastloss bench | check | demo``.

Kept out of the library core (nothing in fastloss imports it; ``fastloss/__main__.py`` does, and so
do the pytest-benchmark files in bench/), but installed with it, so that an installed wheel runs
the commands. Modules by job:

    cases     the losses as benchmark cases, read from fastloss.specs: operands, byte models, records
    timing    steps, timers (triton.testing.do_bench on CUDA, torch.utils.benchmark on CPU), the
              interleaved rounds, summaries, memory, copy bandwidth, device facts, progress (tqdm)
    report    text, markdown and PNG of bench records
    sweep     time against size and the crossover (``bench --sweep``)
    check     ``python -m fastloss check``
    main      the argument parsers and the ``bench`` command

Imports torch, the standard library and fastloss; tqdm, matplotlib, torchvision and liger_kernel
are optional. Nothing here asserts a timing.
"""
