#!/usr/bin/env bash
# FO vs ZO vs Instruct vs Calibrate on the offline corpus, then one set of overlay plots.
#   STEPS=100 BATCH=4 ./experiments/bp_vs_zo_vs_instruct.sh [extra zo-train flags]
set -euo pipefail
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-40}; BATCH=${BATCH:-4}; Q=${Q:-16}; MODEL=${MODEL:-20M}; OUT=${OUT:-runs}/bp_vs_zo
ZO_LR=${ZO_LR:-1e-4}; FO_LR=${FO_LR:-1e-3}
common=(--model_size "$MODEL" --batch_size "$BATCH" --max_steps "$STEPS" --eval_interval $((STEPS / 4 > 0 ? STEPS / 4 : 1))
        --eval_blocks 32 --log_dir "$OUT" --no-plot --disable_checkpoint --no-progress "$@")
$PYTHON -m zo_opt.train --mode FO --optimizer adam --learning_rate "$FO_LR" --run_name FO "${common[@]}"
$PYTHON -m zo_opt.train --mode ZO --q "$Q" --learning_rate "$ZO_LR" --run_name "ZO_q$Q" "${common[@]}"
# Instruct's update has per-coordinate RMS = lr (normalised), like Adam's: an Adam-sized lr.
$PYTHON -m zo_opt.train --mode Instruct --q "$Q" --bp_interval 10 --learning_rate "$FO_LR" \
    --split_dataset_for_bp_zo --run_name "Instruct_q$Q" "${common[@]}"
$PYTHON -m zo_opt.train --mode Calibrate --q "$Q" --bp_interval 10 --learning_rate "$ZO_LR" \
    --bp_learning_rate 1e-2 --run_name "Calibrate_q$Q" "${common[@]}"
$PYTHON -m zo_opt.plot "$OUT/FO" "$OUT/ZO_q$Q" "$OUT/Instruct_q$Q" "$OUT/Calibrate_q$Q" -o "$OUT/plots"
