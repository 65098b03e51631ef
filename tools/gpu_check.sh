#!/usr/bin/env bash
# GPU check sized for one H200 lent for 15 minutes (finishes in under 8):
# `es-mpi bench` on randomly initialised Qwen2.5-1.5B- and 7B-shaped models
# (built from their dimensions, no download), bf16, 8 members, 64 prompts,
# 256 new tokens.  Reports ES efficiency, decode tokens/s, update seconds and
# peak GPU memory per shape, as a table and as JSON.
#
#   tools/gpu_check.sh [OUT_DIR]                  # both shapes
#   SHAPES=qwen2.5-tiny PROMPTS=4 TOKENS=8 tools/gpu_check.sh out   # CPU smoke (the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
SHAPES=${SHAPES:-qwen2.5-1.5b qwen2.5-7b}
PROMPTS=${PROMPTS:-64}
TOKENS=${TOKENS:-256}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
for s in $SHAPES; do
  echo "== $s ($(date +%T))"
  TQDM_DISABLE=1 "$PY" -m es_mpi bench --config configs/gpu_check.yaml \
    --set "model.path=builtin:$s-random" --set "es.prompts_per_generation=$PROMPTS" \
    --set "task.train_size=$PROMPTS" --set "generation.max_new_tokens=$TOKENS" \
    --json "$OUT/$s.json" | tee "$OUT/$s.txt"
done
"$PY" - "$OUT" $SHAPES <<'PY'
import json, sys
out, shapes = sys.argv[1], sys.argv[2:]
print(f"{'shape':<14} {'params':>14} {'ES eff':>7} {'tok/s':>9} {'update s':>9} {'GPU peak GiB':>13}")
for s in shapes:
    r = json.load(open(f"{out}/{s}.json"))
    peak = r.get("gpu_peak_bytes_es")
    print(f"{s:<14} {r['n_params']:>14,} {r['es_efficiency']:>7.3f} {r['decode_tokens_per_s']:>9.1f} "
          f"{r['breakdown_s']['t_update']:>9.2f} {peak / 2**30 if peak else float('nan'):>13.2f}")
PY
