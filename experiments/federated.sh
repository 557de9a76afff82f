#!/usr/bin/env bash
# Federated ZO on the offline KJV corpus with Flower's deployment engine on loopback:
# one SuperLink and one SuperNode per client as separate processes on 127.0.0.1, `flwr run`,
# clients exchanging only ZO step records (seeds + projected gradients) with the server.
# Nothing leaves the machine (telemetry and update checks off, a temporary FLWR_HOME,
# no runtime dependency installation, no Ray). Needs: pip install -e '.[fed,train]'
#
#   experiments/federated.sh                       # GPT-2 20M, 2 clients, 10 rounds
#   ROUNDS=3 CLIENTS=4 experiments/federated.sh --server-opt adam --server-lr 1e-3
#   experiments/federated.sh --fault 1:2:nan       # client 1 sends NaNs in round 2: rejected
#
# Every setting is a flag of `python -m zo_opt.fed.run --help`. Outputs in $OUT:
# summary.json (per round: accepted/rejected with reasons, bytes each way vs FedAvg, val
# loss; the clients' final hashes), global.pt, records.pt; logs in $OUT/work/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON as in the other scripts (PY, its old name, still works); default: the checkout's .venv
PY=${PYTHON:-${PY:-.venv/bin/python}}
command -v "$PY" >/dev/null || { echo "federated.sh: no $PY; set PYTHON to a python with zo-opt[fed,train]" >&2; exit 2; }
OUT=${OUT:-runs/federated}
mkdir -p "$OUT"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec "$PY" -m zo_opt.fed.run \
  --rounds "${ROUNDS:-10}" --num-clients "${CLIENTS:-2}" \
  --model-size "${MODEL_SIZE:-20M}" --dataset kjv --block-size 128 --batch-size 8 \
  --local-steps "${LOCAL_STEPS:-8}" --q "${Q:-8}" --lr 1e-4 --eps 1e-3 --eval-blocks 32 \
  --out-dir "$OUT" --workdir "$OUT/work" "$@"
