#!/usr/bin/env bash
# The whole GPU verification, step by step (all steps at their default limits take more than
# 10 minutes on an H100: pick STEPS). Installs nothing: needs torch, triton and numpy;
# safetensors, tqdm and pytest come from ./.gpudeps when the machine lacks them (make it with
# `make gpudeps` and carry it). Random data only.
#   1. the CUDA tests: the host data path (pinned memory, side stream), the metrics
#      read-back, the expert path (compiled bf16, mixup without a sync), the kernels (bf16
#      included);
#   2. bench/train_check.py: the training loop on CUDA (smoke run with evaluation, the host
#      syncs of the steady steps, one harness run end to end with its three encoding processes,
#      then vit-s16 batch 64: fp32 eager, the fast path (CUDA graphs), without graphs, from
#      host memory, with per-block compilation);
#   2b. bench/profile_step.py: the template's step under the profiler, without and with
#      CUDA graphs (wall vs kernel-busy time per step, launches, top kernels);
#   3. bench/kernel_table.py: compiled training step (fullgraph, reduce-overhead), accuracy
#      against float64 at B = 4,096 and 16,384, lean memory at 16,384 and 32,768 (both lean
#      backwards), the comparison table (lean:fused, lean:panel, fast, plain, plain +
#      compile), ranks at N = 100,000, B = 1,048,576 in lean mode, the config each
#      autotuner chose, then the diagnostics: the device time per kernel and the panel-size
#      sweep;
#   4. the pytest-benchmark suites (their JSON: $OUT/benchmarks.json) and the guard against
#      bench/baselines/<device>.json (when there is none, the run is saved to $OUT as the
#      baseline to commit);
#   then the short tables again, last.
# In priority order, each under its own time limit and all under DEADLINE (seconds, default
# 570: one device command may run 600), so a cut-off run still reports the most and the
# summary always prints.
# Prints the device first and a short summary last (the table, the key lines of each step's
# log, the guard's verdict); with $OUT set, writes logs, the table and the benchmark JSON
# there, replacing an earlier run's. Usage: [STEPS="1 2 2b 3 4"] [T1=… T2=…] [T1_WORKERS=4]
#   [DEADLINE=570] [ONLY=template,nographs] [SPEED_STEPS=60] [HARNESS_S=45] [HARNESS_ISOLATE=1]
#   [TABLE_SIZES=16384:512,65536:512] [DRY=1] bash bench/gpu_check.sh [--quick]
# (STEPS: separated by spaces or commas. ONLY: the speed rows of step 2, as train_check.py
# --only; default all. HARNESS_S: the budget of step 2's harness run, 0 skips it;
# HARNESS_ISOLATE=1 runs it with --isolate, the recipe's processes in the sandbox, GPU
# included. TABLE_SIZES: step 3's table, as kernel_table.py --table. DRY and HARNESS_ISOLATE
# take 1/true/yes or 0/false/no; a value the script does not know stops it before any step.)
# DRY=1 runs steps 2, 2b and 3 on the CPU at tiny sizes (--dry-run: this script's plumbing,
# nothing measured) and skips steps 1 and 4, which need a GPU to mean anything.
set -uo pipefail
# empty arrays are expanded as ${a[@]+"${a[@]}"}: "${a[@]}" of an empty one fails set -u before bash 4.4
cd "$(dirname "$0")/.."
# The settings are checked before anything runs: a typo found after minutes of a lent GPU
# costs the run (HARNESS_ISOLATE=0 once turned isolation on, STEPS="1,3" once ran no step).
usage_error() { echo "gpu_check: $*" >&2; exit 2; }
# flag NAME: 1 for 1/true/yes, empty for 0/false/no or unset (any case)
flag() {
    local v="${!1:-}"
    case "${v,,}" in
        1|true|yes) echo 1 ;;
        ""|0|false|no) echo "" ;;
        *) echo "gpu_check: $1=$v: not a yes/no value (1, true, yes; 0, false, no)" >&2; return 1 ;;
    esac
}
DRY=$(flag DRY) || exit 2
HARNESS_ISOLATE=$(flag HARNESS_ISOLATE) || exit 2
IFS=$' \t\n,' read -r -d '' -a step_words <<< "${STEPS:-1 2 2b 3 4}"
STEPS=" "
for s in ${step_words[@]+"${step_words[@]}"}; do
    case "$s" in
        1|2|2b|3|4) STEPS+="$s " ;;
        "") ;;  # between two commas
        *) usage_error "STEPS: unknown step '$s' (known: 1 2 2b 3 4)" ;;
    esac
done
[ "$STEPS" = " " ] && usage_error "STEPS: no step named (known: 1 2 2b 3 4)"
QUICK=""
case "$#:${1:-}" in
    0:) ;;
    1:--quick) QUICK="--quick" ;;
    *) usage_error "arguments '$*': the only one known is --quick" ;;
esac
PY="${PYTHON:-python3}"
# .gpudeps fills gaps only: after the interpreter's own site-packages, so the machine's
# pytest and its plugins (xdist) stay one installed set
SITE="$("$PY" -c 'import site; print(":".join(site.getsitepackages()))' 2>/dev/null)"
export PYTHONPATH="$PWD${SITE:+:$SITE}:$PWD/.gpudeps${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-}"
[ -n "$DRY" ] && echo "dry run: steps 1 and 4 skipped (they need a GPU), the rest on the CPU at tiny sizes"
status=0
unchecked=()  # what a step could not check: printed in the summary, so a green run says it
# Without $OUT the logs, table and benchmark JSON go to a folder of this run's own, so that
# the summary still reads them
if [ -n "$OUT_DIR" ]; then
    LOGS="$OUT_DIR"
    mkdir -p "$LOGS"
else
    LOGS="$(mktemp -d)"
    trap 'rm -rf "$LOGS"' EXIT
fi
# log FILE: the lines to the screen and appended to FILE (a step may write one in parts)
log() { tee -a "$LOGS/$1"; }
# log_tail N FILE: all the lines to FILE, the last N to the screen (long pytest reports)
log_tail() { tee -a "$LOGS/$2" | tail -n "$1"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
TABLE="$LOGS/kernel_table.md"
RUN_JSON="$LOGS/benchmarks.json"
# A reused $OUT holds an earlier run's files: appended to, its lines would show in this
# run's summary as if they were this run's
rm -f "$TABLE" "$RUN_JSON" "$LOGS"/{tests,train,profile,kernels,suites,guard}.log
START=$SECONDS
DEADLINE="${DEADLINE:-570}"
# limit T: a step's time limit, cut to what is left of DEADLINE (0: no time left)
limit() { local left=$(( DEADLINE - (SECONDS - START) )); (( left < 0 )) && left=0; echo $(( $1 < left ? $1 : left )); }
# run_for T CMD...: CMD under timeout, or a note when the deadline has passed
run_for() {
    local t; t=$(limit "$1"); shift
    if (( t < 5 )); then echo "skipped: DEADLINE ($DEADLINE s) reached"; return 1; fi
    # -k: the training loop takes the first SIGTERM as "end after this step" and ignores
    # later ones, so a step past its limit gets a SIGKILL 15 s on
    timeout -k 15 "$t" "$@"
}

"$PY" -c "import torch, triton; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', '| torch', torch.__version__, '| triton', triton.__version__)" \
    || { echo "torch and triton do not import with $PY (PYTHON= picks another interpreter)"; exit 1; }
# Without a GPU the real steps would only spend minutes of CPU measuring nothing
if [ -z "$DRY" ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device: nothing to check here (DRY=1 rehearses the script's plumbing on the CPU)"
    exit 2
fi

if want 1 && [ -z "$DRY" ]; then
    echo "== 1. CUDA tests: host data path, metrics read-back and kernels"
    if "$PY" -c "import pytest" 2>/dev/null; then
        # Most of this step is Triton compiling each kernel variant (dtype, D, ragged B) on
        # one core: with pytest-xdist there (the GPU image has it) four workers compile at once.
        par=()
        "$PY" -c "import xdist" 2>/dev/null && par=(-n "${T1_WORKERS:-4}")
        run_for "${T1:-240}" "$PY" -m pytest tests/test_data_device.py tests/test_readback.py tests/test_expert.py \
            tests/test_kernels_contrastive.py tests/test_kernels_contrastive_behaviour.py tests/test_kernels_retrieval.py \
            ${par[@]+"${par[@]}"} --durations=5 \
            -q -p no:cacheprovider -o addopts="" -k "cuda or gpu" 2>&1 | log_tail 25 tests.log || status=1
    else
        echo "pytest is not available: step 1 skipped (step 3 still checks accuracy)"
        unchecked+=("step 1, the CUDA tests: pytest does not import (make gpudeps, and carry .gpudeps)")
        status=1  # the first check in priority order did not run
    fi
fi

if want 2; then
    echo "== 2. training loop on CUDA"
    run_for "${T2:-360}" "$PY" bench/train_check.py --steps "${SPEED_STEPS:-60}" ${ONLY:+--only "$ONLY"} \
        ${HARNESS_S:+--harness-budget-s "$HARNESS_S"} ${HARNESS_ISOLATE:+--harness-isolate} ${DRY:+--dry-run} 2>&1 \
        | grep -v Warning | log train.log || status=1
fi

if want 2b; then
    echo "== 2b. where the training step's time goes (profiler: busy fraction, top kernels)"
    small=()
    [ -n "$DRY" ] && small=(--device cpu --preset tiny --batch 16 --image-size 64 --skip 1 --active 2)
    for mode in default reduce-overhead; do
        run_for "${T2B:-150}" "$PY" bench/profile_step.py --compile-mode "$mode" ${small[@]+"${small[@]}"} 2>&1 \
            | grep -v -E "Warning|USDT" | log profile.log || status=1
    done
fi

if want 3; then
    echo "== 3. kernel table"
    args=($QUICK ${DRY:+--dry-run} ${TABLE_SIZES:+--table "$TABLE_SIZES"} --out "$TABLE")
    run_for "${T3:-480}" "$PY" bench/kernel_table.py "${args[@]}" 2>&1 | log kernels.log || status=1
fi

if want 4 && [ -z "$DRY" ]; then
    echo "== 4. benchmark suites and the guard"
    if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
        echo "pytest or pytest-benchmark is not available: step 4 skipped"
        unchecked+=("step 4, the benchmark suites and the guard: pytest or pytest-benchmark does not import (make gpudeps, and carry .gpudeps)")
        status=1
    elif ! timing_lines="$("$PY" -c "from bench.guard import TIMING; print('\n'.join(TIMING))")" \
            || [ -z "$timing_lines" ]; then
        echo "step 4 skipped: bench.guard's timing options (TIMING) do not import" | log guard.log
        status=1
    else
        SLUG=$("$PY" -c "from bench.guard import slug, current_device; print(slug(current_device()))")
        mapfile -t timing <<< "$timing_lines"
        # pytest runs here rather than inside the guard, whose run lands in a temporary
        # folder of the device machine: written to $OUT, the raw figures come back whatever
        # the guard makes of them (the same timing options as the guard's own run). They get
        # T4 but end 20 s before DEADLINE at the latest: the guard's time after them.
        t4=$(( $(limit $(( ${T4:-240} + 20 ))) - 20 ))
        run_for "$t4" "$PY" -m pytest bench "${timing[@]}" --benchmark-json="$RUN_JSON" 2>&1 \
            | log_tail 15 suites.log
        rc=${PIPESTATUS[0]}
        ran="pytest exit $rc"
        (( t4 < 5 )) && ran="not run: DEADLINE reached"
        if [ ! -s "$RUN_JSON" ]; then kept="no benchmark JSON written"
        elif [ -n "$OUT_DIR" ]; then kept="the figures in \$OUT/benchmarks.json"
        else kept="the figures not kept (no \$OUT)"; fi
        echo "benchmarks: $ran, $kept" | log guard.log
        (( rc == 0 )) || status=1
        # the guard only reads two JSON files (well under a second): 15 s of the 20 kept for it
        if [ ! -s "$RUN_JSON" ]; then
            unchecked+=("step 4, the regression guard: the suites wrote no benchmark JSON ($ran)")
            status=1
        elif [ -f "bench/baselines/$SLUG.json" ]; then
            timeout -k 5 15 "$PY" -m bench.guard check --run "$RUN_JSON" 2>&1 | log_tail 30 guard.log || status=1
        else
            target="${OUT_DIR:-bench/baselines}/$SLUG.json"
            echo "no baseline for this device yet: saving this run as bench/baselines/$SLUG.json (commit it from \$OUT)"
            [ -n "$OUT_DIR" ] && rm -f "$target"  # an earlier run's, which save would weigh against this one
            timeout -k 5 15 "$PY" -m bench.guard save --run "$RUN_JSON" --baseline "$target" 2>&1 \
                | log_tail 5 guard.log || status=1
            unchecked+=("step 4, the regression guard: no baseline for this device, so nothing was compared (this run saved one)")
        fi
    fi
fi

echo "==== summary"
want 3 && [ -f "$TABLE" ] && cat "$TABLE"
grep -h -E "^(smoke_status|sync_check|harness_status|harness_reason|speed|FAILED|train_check: stopped)" "$LOGS/train.log" 2>/dev/null
grep -h -E "^(per step|device: .*overrides)" "$LOGS/profile.log" 2>/dev/null
# the guard's verdict (or error) and its regressions, which its table above may have cut
grep -h -E "^(benchmarks: |guard: |python -m bench.guard: )" "$LOGS/guard.log" 2>/dev/null
grep -h -E "^REGRESSION " "$LOGS/guard.log" 2>/dev/null | head -n 10
for note in ${unchecked[@]+"${unchecked[@]}"}; do echo "NOT CHECKED: $note"; done
exit $status
