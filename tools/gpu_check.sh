#!/usr/bin/env bash
# GPU check sized for one H200 lent for 15 minutes: `es-mpi bench` on
# randomly initialised Qwen2.5-1.5B- and 7B-shaped models (built from their
# dimensions, no download), bf16, 8 members, 64 prompts, 256 new tokens, with
# full-rank and low-rank noise (low-rank decodes all 8 x 64 rows in one batch).
# Reports ES efficiency against pure batched inference at the same rows, decode
# tokens/s, update seconds and peak GPU memory per shape and noise kind, as a
# table and as JSON, then the scale model over both kinds.
#
#   tools/gpu_check.sh [OUT_DIR]                  # both shapes, both noise kinds
#   NOISE=lowrank tools/gpu_check.sh out          # one kind
#   SHAPES=qwen2.5-tiny PROMPTS=4 TOKENS=8 tools/gpu_check.sh out   # CPU smoke (the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
SHAPES=${SHAPES:-qwen2.5-1.5b qwen2.5-7b}
PROMPTS=${PROMPTS:-64}
TOKENS=${TOKENS:-256}
NOISE=${NOISE:-full lowrank}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
POP=$(awk '/^ *population:/ {print $2; exit}' configs/gpu_check.yaml)
for s in $SHAPES; do
  for n in $NOISE; do
    echo "== $s $n ($(date +%T))"
    rows=0  # full: one member's prompts per tile; lowrank: every row of the rank in one batch
    [ "$n" = lowrank ] && rows=$((POP * PROMPTS))
    TQDM_DISABLE=1 "$PY" -m es_mpi bench --config configs/gpu_check.yaml \
      --set "model.path=builtin:$s-random" --set "es.prompts_per_generation=$PROMPTS" \
      --set "task.train_size=$PROMPTS" --set "generation.max_new_tokens=$TOKENS" \
      --set "es.noise=$n" --set "generation.batch_size=$rows" \
      --json "$OUT/$s-$n.json" | tee "$OUT/$s-$n.txt"
  done
done
"$PY" - "$OUT" "$SHAPES" "$NOISE" <<'PY'
import json, sys
out, shapes, kinds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print(f"{'shape':<14} {'noise':<8} {'params':>14} {'ES eff':>7} {'tok/s':>9} {'update s':>9} {'GPU peak GiB':>13}")
for s in shapes:
    for n in kinds:
        r = json.load(open(f"{out}/{s}-{n}.json"))
        peak = r.get("gpu_peak_bytes_es")
        print(f"{s:<14} {n:<8} {r['n_params']:>14,} {r['es_efficiency']:>7.3f} {r['decode_tokens_per_s']:>9.1f} "
              f"{r['breakdown_s']['t_update']:>9.2f} {peak / 2**30 if peak else float('nan'):>13.2f}")
PY
last=${SHAPES##* }
"$PY" tools/scale_model.py $(for n in $NOISE; do echo "$OUT/$last-$n.json"; done) --out "$OUT/scale_model.png" \
  | tee "$OUT/scale_model.txt"
