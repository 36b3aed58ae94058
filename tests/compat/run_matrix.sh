#!/usr/bin/env bash
# The compat matrix: a small subset of the suite on each tested TensorFlow x Keras pair.
#
#   tests/compat/run_matrix.sh [COMBO ...]      (default: every combination below)
#
# Each COMBO is a virtualenv under $TF_ZERO_VENVS (default ~/.cache/tf_zero/venvs), created
# with the pins below on first use and reused afterwards. Into it the checkout is installed
# with `pip install -e .` (dependencies included), and `pip freeze` before and after must
# agree on everything but tf_zero: an environment that already has a supported TensorFlow
# and Keras keeps them. The COMBO `current` is the Python on PATH, left as it is: nothing is
# installed, the checkout is put on PYTHONPATH. Then each test selection runs in its own
# pytest process (niced, one at a time: the tests split the CPU into 4 logical devices) and
# a table of pass / fail / skip counts and times is printed at the end.
#
# Environment: TF_ZERO_VENVS (where the venvs live), TF_ZERO_MATRIX_TESTS (test selections
# separated by ';', each as given to pytest, quotes allowed: "tests/x.py -k 'a or b'"), TF_ZERO_MATRIX_TIMEOUT (seconds per selection,
# default 1800), TF_ZERO_MATRIX_LOGS (default $TF_ZERO_VENVS/logs).
set -uo pipefail

CHECKOUT=$(cd "$(dirname "$0")/../.." && pwd)
VENVS=${TF_ZERO_VENVS:-$HOME/.cache/tf_zero/venvs}
LOGS=${TF_ZERO_MATRIX_LOGS:-$VENVS/logs}
TIMEOUT=${TF_ZERO_MATRIX_TIMEOUT:-1800}

# name -> what pip installs into a new venv. For TensorFlow 2.19 and 2.20 the Keras pip
# installed beside each when it was new, and the newest Keras; TensorFlow 2.21 needs 3.12+.
declare -A PINS=(
    [tf219-k310]="tensorflow==2.19.* keras==3.10.*"
    [tf219]="tensorflow==2.19.* keras==3.15.*"
    [tf220-k311]="tensorflow==2.20.* keras==3.11.*"
    [tf220]="tensorflow==2.20.* keras==3.15.*"
    [tf221]="tensorflow==2.21.* keras==3.15.*"
)
ORDER=(tf219-k310 tf219 tf220-k311 tf220 tf221)
TEST_TOOLS="pytest>=8 scikit-learn>=1.3"

# Private API on this version; Keras' golden values through ZeroOptimizer; the TensorFlow
# tutorial's loop at stages 1, 2 and 3 against MirroredStrategy; checkpoints, Keras files
# and a cut-short backup written by tf_zero 0.1.0 on TensorFlow 2.21 restored at another
# replica count; BackupAndRestore mid-epoch, SIGTERM, another replica count and stage;
# the whole-variable partition against MirroredStrategy at 4 replicas and its overflow
# agreement; accumulation against one large batch; an overflow on one replica (also under
# hybrid sharding); 2 workers as a SLURM step with hybrid sharding at stage 3 and with Lamb
# at stage 2, their tf_zero.Checkpoint restored across both workers and in one process, and
# their .weights.h5 file; restored shards read without a copy (TensorFlow's copy-on-read mode
# avoided); a flipped bit in any data file refused by TensorFlow's CRC32C (and its message
# naming the file); whole-variable slots written and read by their owners; asynchronous saves
# (the snapshot of the call, a failure raised by the next save; across 2 workers a failing
# write and SIGTERM while a write is in flight).
DEFAULT_TESTS="tests/test_private_api.py;tests/test_optimizer_golden.py;\
tests/test_optimizer_custom_loop.py -k tutorial_loop;tests/test_checkpoint_release.py;\
tests/test_checkpoint_slices.py -k without_a_copy;\
tests/test_checkpoint_parallel.py -k 'flipped or owners';\
tests/test_checkpoint_async.py;tests/test_checkpoint_async_faults.py -k 'failing or sigterm';\
tests/test_fault_backup.py;\
tests/test_whole_partition.py -k '(match_mirrored and 4) or overflow';\
tests/test_step_accumulation.py -k 'micro_steps and 4-2';\
tests/test_mixed_precision_loss_scale.py -k overflow_on_one;\
tests/test_hybrid_sharding.py -k '(slurm and 3) or (two_tasks and lamb)';\
tests/test_quantized_collectives.py -k '(round_trip and 200 and random) or quantized_reduce_scatter or hybrid or overflow'"
IFS=';' read -r -a TESTS <<< "${TF_ZERO_MATRIX_TESTS:-$DEFAULT_TESTS}"

combos=("$@")
[ ${#combos[@]} -eq 0 ] && combos=("${ORDER[@]}")
mkdir -p "$LOGS"
cd "$CHECKOUT" || exit 2
ROWS=()
status=0

# pip freeze without the tf_zero line(s), which an editable install changes by design.
freeze() { "$1" -m pip freeze 2>/dev/null | grep -viE '^(-e .*|tf[_-]zero[ =@].*|# Editable .*tf[_-]zero.*)$' | sort; }

for combo in "${combos[@]}"; do
    start=$(date +%s)
    if [ "$combo" = current ]; then
        py=$(command -v python3 || command -v python)
        pip_check="not installed"
    else
        venv=$VENVS/$combo
        py=$venv/bin/python
        if [ ! -x "$py" ]; then
            [ -n "${PINS[$combo]:-}" ] || { echo "unknown combination $combo" >&2; exit 2; }
            echo "== $combo: creating $venv (${PINS[$combo]})"
            python3 -m venv "$venv" &&
                "$py" -m pip install -q ${PINS[$combo]} $TEST_TOOLS > "$LOGS/$combo-create.log" 2>&1 ||
                { echo "$combo: venv creation failed, see $LOGS/$combo-create.log" >&2; status=1; continue; }
        fi
        freeze "$py" > "$LOGS/$combo-freeze-before.txt"
        echo "== $combo: pip install -e ."
        if "$py" -m pip install -e . > "$LOGS/$combo-pip-e.log" 2>&1; then
            freeze "$py" > "$LOGS/$combo-freeze-after.txt"
            if diff "$LOGS/$combo-freeze-before.txt" "$LOGS/$combo-freeze-after.txt" \
                    > "$LOGS/$combo-freeze.diff"; then
                pip_check="unchanged"
            else
                pip_check="CHANGED"; status=1
                echo "$combo: pip install -e . changed the environment:" >&2
                cat "$LOGS/$combo-freeze.diff" >&2
            fi
        else
            pip_check="FAILED"; status=1
        fi
    fi
    versions=$(PYTHONPATH=$CHECKOUT "$py" -c '
import importlib.metadata as m, sys
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"
print("%d.%d" % sys.version_info[:2], *map(v, ["tensorflow", "keras", "keras-hub"]))
' 2>/dev/null)
    read -r pyv tfv kv hubv <<< "$versions"
    cells=()
    for sel in "${TESTS[@]}"; do
        eval "args=($sel)"  # a selection may quote a -k expression
        name=$(basename "${args[0]}" .py)
        log="$LOGS/$combo-$name.log"
        echo "== $combo: pytest $sel"
        t0=$(date +%s)
        PYTHONPATH=$CHECKOUT timeout "$TIMEOUT" nice -n 10 \
            "$py" -m pytest -q -p no:cacheprovider "${args[@]}" > "$log" 2>&1
        rc=$?
        t=$(( $(date +%s) - t0 ))
        summary=$(grep -E '^=* ?[0-9]+ (passed|failed|error|skipped)|^=* ?(no tests ran)' "$log" | tail -1)
        count() { grep -oE "[0-9]+ $1" <<< "$summary" | grep -oE '^[0-9]+' || echo 0; }
        p=$(count passed); f=$(( $(count failed) + $(count error) )); s=$(count skipped)
        [ "$rc" -eq 124 ] && f="$f+timeout"
        [ "$rc" -ne 0 ] && [ "$f" = 0 ] && f="rc=$rc"
        [ "$rc" -ne 0 ] && status=1
        cells+=("$name ${p}/${f}/${s} ${t}s")
    done
    total=$(( $(date +%s) - start ))
    ROWS+=("$combo|$pyv|$tfv|$kv|$hubv|$pip_check|$(IFS=,; echo "${cells[*]}")|${total}s")
done

echo
echo "tf_zero compat matrix, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$CHECKOUT" rev-parse --short HEAD)"
echo "cells: passed/failed/skipped and wall time per test selection"
echo
echo "| combination | Python | TensorFlow | Keras | keras-hub | pip install -e . | tests | time |"
echo "|---|---|---|---|---|---|---|---|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r c pyv tfv kv hubv pc cells total <<< "$row"
    echo "| $c | $pyv | $tfv | $kv | $hubv | $pc | ${cells//,/; } | $total |"
done
exit "$status"
