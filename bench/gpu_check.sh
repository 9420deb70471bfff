#!/usr/bin/env bash
# fastloss GPU check: install, test suite on CUDA, self-check, pytest benchmarks, the crossover sweep
# and the row-kernel launch sweep, then one combined report:
#   bench/results/<YYYY-MM-DD>-<gpu-slug>.{json,md,png,log} and <YYYY-MM-DD>-<gpu-slug>-sweep.png
#
#   bash bench/gpu_check.sh                 # from anywhere; works in the repository it lives in
#   OUT=/some/dir bash bench/gpu_check.sh   # also copy those (at most 8) files there
#
# Needs a CUDA GPU with torch, triton, pytest and pytest-benchmark installed; no network.
# Uses when present: pytest-xdist (tests with -n 8), torchvision (focal baseline), matplotlib (plots),
# tqdm (progress), a Liger-Kernel wheel in .whl/ at the repository root (installed with --no-deps into
# a temporary --target directory put on PYTHONPATH, for the cross-entropy baseline).
#
# Finishes within GPU_CHECK_DEADLINE=285 s on one H100/H200 (so that it runs twice in a quarter of
# an hour): every step is time-boxed by its own limit and by what is left of the deadline (20 s kept
# for the report). Limits (seconds, override by environment):
#   GPU_CHECK_TESTS_TIMEOUT=85   the test suite (-n 8 with xdist)
#   GPU_CHECK_CHECK_TIMEOUT=30   python -m fastloss check (after the tests: kernels compiled)
#   GPU_CHECK_BENCH_BUDGET=56    one pytest run of bench_pointwise, bench_softmax, bench_embedding and
#                                bench_linear_xent; each file gets GPU_CHECK_FILE_BUDGET=14 (the rest of a
#                                file is skipped, and listed as such, after it); pointwise sizes
#                                FASTLOSS_BENCH_SIZES=2**26,2**24 unless set
#   GPU_CHECK_SWEEP_LIMIT=40     crossover: python -m fastloss bench --sweep, mse, cross_entropy,
#                                contrastive, info_nce, 2**8 .. 2**26, kernels forced (backend triton):
#                                device and host time, the suggested fastloss._backend.SMALL_PROBLEM_NUMEL
#   GPU_CHECK_TUNE_BUDGET=15     bench/sweep_softmax.py (row-kernel launch configurations, CUDA only)
# Other knobs: PYTHON (default python3), GPU_CHECK_MAXFAIL=10, GPU_CHECK_SKIP_INSTALL=1,
# GPU_CHECK_ALLOW_CPU=1 (dry run without a GPU: the quick test subset of the README instead of the
# suite, CPU sizes, no deadline, nothing CUDA-specific checked).
# Timeouts send SIGINT first, so pytest still writes its reports. A failing step does not stop the
# later ones; the exit status is 0 only if every step passed (2 when there is no usable GPU/python).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
DEADLINE=${GPU_CHECK_DEADLINE:-285}
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-85}
CHECK_TIMEOUT=${GPU_CHECK_CHECK_TIMEOUT:-30}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-56}
FILE_BUDGET=${GPU_CHECK_FILE_BUDGET:-14}
SWEEP_LIMIT=${GPU_CHECK_SWEEP_LIMIT:-40}
TUNE_BUDGET=${GPU_CHECK_TUNE_BUDGET:-15}
MAXFAIL=${GPU_CHECK_MAXFAIL:-10}
# the quick test subset (README, development): what a CPU dry run runs instead of the suite
QUICK_TESTS=(tests/test_lean.py tests/test_modules.py tests/test_bench_cli.py tests/test_specs.py)
export PYTHONUNBUFFERED=1

CPU_RUN=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: '$PY' has no torch with a usable CUDA device (GPU_CHECK_ALLOW_CPU=1 for a dry run)" >&2
        exit 2
    fi
    CPU_RUN=1
    GPU_NAME="cpu-$(uname -m)"
    DEADLINE=${GPU_CHECK_DEADLINE:-100000}
else
    GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
STAMP="$(date +%F)-${SLUG:-gpu}"
RESULTS="$ROOT/bench/results"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastloss-gpu-check.XXXXXX")
mkdir -p "$RESULTS"
LOG="$RESULTS/$STAMP.log"
LOGS=("$LOG")
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOGS+=("$OUT/$STAMP.log"); fi  # a killed run still leaves its log
: >"$LOG"
exec > >(tee "${LOGS[@]}") 2>&1
TEE_PID=$!

T0=$(date +%s)
STEPS=()
FAILED=0
banner() { printf '\n===== [%4ss] %s =====\n' "$(( $(date +%s) - T0 ))" "$*"; }
record() {  # record NAME RC
    STEPS+=("--step" "$1=$2")
    if [ "$2" != 0 ]; then FAILED=1; echo ">>> step $1 FAILED (rc $2)"; else echo ">>> step $1 ok"; fi
}
limit() {  # limit SECONDS: SECONDS, or what is left of the deadline less 20 s for the report (at least 5)
    local left=$(( DEADLINE - 20 - ($(date +%s) - T0) ))
    [ "$left" -lt 5 ] && left=5
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
run_boxed() {  # run_boxed SECONDS CMD...: SIGINT at SECONDS, SIGKILL 10 s later
    local t=$1; shift
    timeout -s INT -k 10 "$t" "$@"
}

banner "fastloss gpu_check $STAMP in $ROOT (log: $LOG; deadline ${DEADLINE}s)"
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then GIT_REV="$GIT_REV+dirty"; fi
echo "git $GIT_REV"

banner "install (pip install -e . --no-deps --no-build-isolation)"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    echo "skipped (GPU_CHECK_SKIP_INSTALL=1)"
else
    "$PY" -m pip install -q --disable-pip-version-check --no-input -e . --no-deps --no-build-isolation
    record install $?
fi

LIGER_WHEELS=("$ROOT"/.whl/liger_kernel-*.whl)
if [ -f "${LIGER_WHEELS[0]}" ]; then
    if "$PY" -m pip install -q --disable-pip-version-check --no-input --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$WORK/site" "${LIGER_WHEELS[@]}"; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed $(basename "${LIGER_WHEELS[0]}") into $WORK/site (on PYTHONPATH)"
    else
        echo "could not install ${LIGER_WHEELS[*]}: liger rows will be skipped"
    fi
else
    echo "no .whl/liger_kernel-*.whl: liger rows will be skipped"
fi

banner "environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for mod in ("triton", "torchvision", "matplotlib", "xdist", "pytest_benchmark", "tqdm", "liger_kernel"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e: print(mod, "missing:", type(e).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
EOF

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi  # Triton compiles are CPU-bound
if [ "$CPU_RUN" = 1 ]; then
    banner "quick tests (CPU dry run: ${QUICK_TESTS[*]})"
    "$PY" -m pytest "${QUICK_TESTS[@]}" -q -p no:cacheprovider --maxfail="$MAXFAIL" --junitxml="$WORK/tests.xml"
else
    T=$(limit "$TESTS_TIMEOUT")
    banner "tests (timeout ${T}s)"
    run_boxed "$T" "$PY" -m pytest tests -q -p no:cacheprovider --maxfail="$MAXFAIL" "${XDIST[@]}" \
        --junitxml="$WORK/tests.xml"
fi
record tests $?

T=$(limit "$CHECK_TIMEOUT")
banner "python -m fastloss check (timeout ${T}s)"
run_boxed "$T" "$PY" -m fastloss check
record check $?

# One pytest run of the bench files, each with its share of the budget (the rest of a file is skipped,
# and listed as such); the pointwise targets are stated at N = 2**26: on a GPU measure that size first.
[ "$CPU_RUN" = 1 ] || export FASTLOSS_BENCH_SIZES=${FASTLOSS_BENCH_SIZES:-2**26,2**24}
T=$(limit $(( BENCH_BUDGET + 40 )))  # a torch.compile started before the budget ran out may take 20 s
banner "pytest bench/bench_{pointwise,softmax,embedding,linear_xent}.py (budget ${BENCH_BUDGET}s, ${FILE_BUDGET}s a file)"
FASTLOSS_BENCH_BUDGET_S=$(( T - 40 < BENCH_BUDGET ? T - 40 : BENCH_BUDGET )) FASTLOSS_BENCH_FILE_BUDGET_S=$FILE_BUDGET \
    run_boxed "$T" "$PY" -m pytest bench/bench_pointwise.py bench/bench_softmax.py bench/bench_embedding.py \
    bench/bench_linear_xent.py --benchmark-only -q -p no:cacheprovider --benchmark-json="$WORK/bench.json" \
    --benchmark-columns=median,rounds
record bench $?

# The crossover (issue 11, item 3): time against size, torch.nn eager vs fastloss with the kernels forced.
T=$(limit $(( SWEEP_LIMIT + 20 )))
banner "python -m fastloss bench --sweep (crossover; time limit ${SWEEP_LIMIT}s)"
PLOT=()
if "$PY" -c "import matplotlib" 2>/dev/null; then PLOT=(--plot "$RESULTS/$STAMP-sweep.png"); fi
run_boxed "$T" "$PY" -m fastloss bench --sweep --losses mse cross_entropy contrastive info_nce \
    --repeat 3 --round-time 0.02 --warmup 2 --time-limit "$(( T - 20 < SWEEP_LIMIT ? T - 20 : SWEEP_LIMIT ))" \
    --json "$WORK/sweep.json" "${PLOT[@]}"
record sweep $?

# Launch-configuration sweep of the row kernel (CUDA only: the interpreter's timings mean nothing).
if [ "$CPU_RUN" = 0 ]; then
    T=$(limit $(( TUNE_BUDGET + 15 )))
    banner "bench/sweep_softmax.py (budget ${TUNE_BUDGET}s)"
    run_boxed "$T" "$PY" bench/sweep_softmax.py --budget "$TUNE_BUDGET" --json "$WORK/tune.json"
    record tune $?
fi

banner "report"
"$PY" bench/to_markdown.py --pytest-json "$WORK/bench.json" --sweep-json "$WORK/sweep.json" \
    --tune-json "$WORK/tune.json" --tests-junit "$WORK/tests.xml" "${STEPS[@]}" --git-rev "$GIT_REV" \
    --out-json "$RESULTS/$STAMP.json" --out-md "$RESULTS/$STAMP.md" --out-png "$RESULTS/$STAMP.png"
RC=$?
if [ "$RC" != 0 ]; then FAILED=1; echo ">>> report FAILED (rc $RC)"; else cat "$RESULTS/$STAMP.md"; fi

banner "done: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL) in $(( $(date +%s) - T0 ))s; results in $RESULTS/$STAMP.*"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
if [ -n "${OUT:-}" ]; then  # 5 files: the log (written there already), the combined JSON, the markdown, 2 plots
    for f in "$RESULTS/$STAMP.json" "$RESULTS/$STAMP.md" "$RESULTS/$STAMP.png" "$RESULTS/$STAMP-sweep.png"; do
        [ -s "$f" ] && cp "$f" "$OUT/"
    done
fi
rm -rf "$WORK"
exit "$FAILED"
