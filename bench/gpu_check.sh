#!/usr/bin/env bash
# fastloss GPU check: install, self-check, test suite on CUDA, pytest benchmarks, CLI benchmark,
# and one combined report: bench/results/<YYYY-MM-DD>-<gpu-slug>.json and .md (+ .png, .log).
#
#   bash bench/gpu_check.sh                 # from anywhere; works in the repository it lives in
#   OUT=/some/dir bash bench/gpu_check.sh   # also copy log + results there (as the GPU tool wants)
#
# Needs a CUDA GPU with torch, triton, pytest and pytest-benchmark installed; no network.
# Uses when present: pytest-xdist (tests with -n 8), torchvision (focal baseline), matplotlib (plot),
# a Liger-Kernel wheel in .whl/ at the repository root (installed with --no-deps into a temporary
# --target directory put on PYTHONPATH, for the cross-entropy baseline; its rows are skipped without).
# Expected time on one H100/H200: about 8.5 minutes; every step is time-boxed (seconds, override
# by environment): GPU_CHECK_TESTS_TIMEOUT=150 (400 in a CPU dry run); pytest benchmarks, one run
# per file, each skipping the rest of its file after its budget: GPU_CHECK_BENCH_BUDGET=50
# (bench_pointwise.py, sizes
# FASTLOSS_BENCH_SIZES=2**26,2**24 unless set),
# GPU_CHECK_SOFTMAX_BUDGET=50 (bench_softmax.py), GPU_CHECK_EMBED_BUDGET=40 (bench_embedding.py,
# when present), GPU_CHECK_LXENT_BUDGET=45 (bench_linear_xent.py), GPU_CHECK_OVERHEAD_BUDGET=20
# (bench/bench_overhead.py: fwd+bwd time against size, fastloss vs torch.nn, its own JSON
# bench/results/<date>-<gpu>-overhead.json); GPU_CHECK_CLI_LIMIT=60 (CLI, row and embedding losses
# first: skip the rest after this);
# GPU_CHECK_SWEEP_BUDGET=40 (bench/sweep_softmax.py, row-kernel launch configurations, CUDA only,
# written to bench/results/<date>-<gpu>-sweep.json).
# Other knobs: PYTHON (default python3), GPU_CHECK_MAXFAIL=10, GPU_CHECK_SKIP_INSTALL=1,
# GPU_CHECK_ALLOW_CPU=1 (dry run without a GPU: CPU sizes, nothing CUDA-specific checked).
# Timeouts send SIGINT first, so pytest still writes its reports. A failing step does not stop the
# later ones; the exit status is 0 only if every step passed
# (2 when there is no usable GPU/python at all).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-150}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-50}

SOFTMAX_BUDGET=${GPU_CHECK_SOFTMAX_BUDGET:-50}
LXENT_BUDGET=${GPU_CHECK_LXENT_BUDGET:-45}
EMBED_BUDGET=${GPU_CHECK_EMBED_BUDGET:-40}
OVERHEAD_BUDGET=${GPU_CHECK_OVERHEAD_BUDGET:-20}
CLI_LIMIT=${GPU_CHECK_CLI_LIMIT:-60}
SWEEP_BUDGET=${GPU_CHECK_SWEEP_BUDGET:-40}
MAXFAIL=${GPU_CHECK_MAXFAIL:-10}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: '$PY' has no torch with a usable CUDA device (GPU_CHECK_ALLOW_CPU=1 for a dry run)" >&2
        exit 2
    fi
    GPU_NAME="cpu-$(uname -m)"
    TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-400}  # the whole suite under the interpreter, no xdist
else
    GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
STAMP="$(date +%F)-${SLUG:-gpu}"
RESULTS="$ROOT/bench/results"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastloss-gpu-check.XXXXXX")
mkdir -p "$RESULTS"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/gpu_check.log"; else LOG="$RESULTS/$STAMP.log"; fi
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

T0=$(date +%s)
STEPS=()
FAILED=0
banner() { printf '\n===== [%4ss] %s =====\n' "$(( $(date +%s) - T0 ))" "$*"; }
record() {  # record NAME RC
    STEPS+=("--step" "$1=$2")
    if [ "$2" != 0 ]; then FAILED=1; echo ">>> step $1 FAILED (rc $2)"; else echo ">>> step $1 ok"; fi
}

banner "fastloss gpu_check $STAMP in $ROOT (logs: $LOG)"
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

banner "Liger-Kernel (optional baseline: .whl/liger_kernel-*.whl)"
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
command -v nvidia-smi >/dev/null && nvidia-smi
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
for mod in ("torchvision", "matplotlib", "xdist", "pytest_benchmark", "liger_kernel"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e: print(mod, "missing:", type(e).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
EOF

banner "python -m fastloss check"
"$PY" -m fastloss check
record check $?

banner "tests (timeout ${TESTS_TIMEOUT}s)"
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi  # Triton compiles are CPU-bound
timeout -s INT -k 20 "$TESTS_TIMEOUT" "$PY" -m pytest tests -q -p no:cacheprovider --maxfail="$MAXFAIL" \
    "${XDIST[@]}" --junitxml="$WORK/tests.xml"
record tests $?

# One pytest run per bench file, each with its own budget (FASTLOSS_BENCH_BUDGET_S: the rest of the
# file is skipped, and listed as such, after it) and a hard timeout 60 s past it.
PYTEST_JSONS=()
bench_file() {  # bench_file STEP FILE BUDGET
    local step=$1 file=$2 budget=$3
    if [ ! -f "$file" ]; then echo "$file: not in this checkout, skipped"; return; fi
    banner "pytest $file --benchmark-only (budget ${budget}s)"
    FASTLOSS_BENCH_BUDGET_S=$budget timeout -s INT -k 20 $(( budget + 60 )) \
        "$PY" -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$WORK/$step.json" --benchmark-columns=min,median,max,rounds
    record "$step" $?
    PYTEST_JSONS+=(--pytest-json "$WORK/$step.json")
}
# the pointwise targets are stated at N = 2**26: on a GPU measure that size first, within the budget
case "$GPU_NAME" in cpu-*) ;; *) export FASTLOSS_BENCH_SIZES=${FASTLOSS_BENCH_SIZES:-2**26,2**24} ;; esac
bench_file bench_pointwise bench/bench_pointwise.py "$BENCH_BUDGET"
bench_file bench_softmax bench/bench_softmax.py "$SOFTMAX_BUDGET"
bench_file bench_embedding bench/bench_embedding.py "$EMBED_BUDGET"
bench_file bench_linear_xent bench/bench_linear_xent.py "$LXENT_BUDGET"

# Per-call overhead and crossover (time against size, fastloss vs torch.nn): its own JSON, kept out of
# the report's tables (it is a curve per loss, not a row).
if [ -f bench/bench_overhead.py ]; then
    banner "pytest bench/bench_overhead.py --benchmark-only (budget ${OVERHEAD_BUDGET}s)"
    FASTLOSS_BENCH_BUDGET_S=$OVERHEAD_BUDGET timeout -s INT -k 20 $(( OVERHEAD_BUDGET + 60 )) \
        "$PY" -m pytest bench/bench_overhead.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$RESULTS/$STAMP-overhead.json" --benchmark-columns=median,rounds
    record overhead $?
fi

banner "python -m fastloss bench (time limit ${CLI_LIMIT}s)"
PLOT=()
if "$PY" -c "import matplotlib" 2>/dev/null; then PLOT=(--plot "$WORK/$STAMP.png"); fi
timeout -s INT -k 20 $(( CLI_LIMIT + 90 )) "$PY" -m fastloss bench --time-limit "$CLI_LIMIT" \
    --losses cross_entropy focal_loss contrastive triplet info_nce \
             sigmoid_focal mse bce_with_logits huber smooth_l1 l1 \
    --json "$WORK/bench-cli.json" "${PLOT[@]}"
record cli $?

# Launch-configuration sweep of the row kernel on the shapes whose targets were missed (CUDA only:
# the interpreter's timings mean nothing). Last, so that it cannot crowd out the results above.
case "$GPU_NAME" in
    cpu-*) ;;
    *)
        banner "bench/sweep_softmax.py (budget ${SWEEP_BUDGET}s)"
        timeout -s INT -k 20 $(( SWEEP_BUDGET + 60 )) "$PY" bench/sweep_softmax.py --budget "$SWEEP_BUDGET" \
            --json "$RESULTS/$STAMP-sweep.json"
        record sweep $?
        ;;
esac

banner "report"
"$PY" bench/to_markdown.py "${PYTEST_JSONS[@]}" --cli-json "$WORK/bench-cli.json" \
    --tests-junit "$WORK/tests.xml" "${STEPS[@]}" --git-rev "$GIT_REV" \
    --out-json "$RESULTS/$STAMP.json" --out-md "$RESULTS/$STAMP.md"
RC=$?
if [ "$RC" != 0 ]; then FAILED=1; echo ">>> report FAILED (rc $RC)"; else cat "$RESULTS/$STAMP.md"; fi
[ -f "$WORK/$STAMP.png" ] && cp "$WORK/$STAMP.png" "$RESULTS/"

banner "done: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL); results in $RESULTS/$STAMP.{json,md}"
if [ -n "${OUT:-}" ]; then
    for f in "$RESULTS/$STAMP.json" "$RESULTS/$STAMP.md" "$RESULTS/$STAMP.png" "$RESULTS/$STAMP-sweep.json" \
             "$RESULTS/$STAMP-overhead.json" \
             "$WORK/bench_pointwise.json" "$WORK/bench_softmax.json" "$WORK/bench_embedding.json" \
             "$WORK/bench-cli.json" "$WORK/tests.xml"; do
        [ -s "$f" ] && cp "$f" "$OUT/"
    done
    echo "copied results to $OUT"
fi
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
rm -rf "$WORK"
exit "$FAILED"
