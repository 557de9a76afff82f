#!/usr/bin/env bash
# ZO q sweep at a fixed step count: loss curves and final loss vs q.
#   STEPS=50 QS="1 4 16" ./experiments/q_sweep.sh [extra zo-train flags]
set -euo pipefail
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-30}; BATCH=${BATCH:-4}; QS=${QS:-1 2 4 8 16}; LR=${LR:-1e-4}; MODEL=${MODEL:-20M}; OUT=${OUT:-runs}/q_sweep
runs=()
for q in $QS; do
    $PYTHON -m zo_opt.train --mode ZO --q "$q" --learning_rate "$LR" --model_size "$MODEL" --batch_size "$BATCH" \
        --max_steps "$STEPS" --eval_interval "$STEPS" --eval_blocks 32 --log_dir "$OUT" --run_name "q$q" \
        --no-plot --disable_checkpoint --no-progress "$@"
    runs+=("$OUT/q$q")
done
$PYTHON -m zo_opt.plot "${runs[@]}" -o "$OUT/plots"
