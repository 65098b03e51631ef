#!/usr/bin/env bash
# The GPU check, sized for one H200 lent for 15 minutes of device time.
#
# 1. Preflight (tools/gpu_preflight.py, ~1 min): torch, CUDA, transformers and
#    vLLM versions, the GPU's name and SM count, the transformers range, and
#    two rows decoded on the GPU with finite logits.  A failure stops here.
# 2. Per shape (randomly initialised Qwen2.5-1.5B / 7B dimensions, no
#    download), per noise kind (full, lowrank) and per decoding backend (hf,
#    and vllm where it imports): `es-mpi bench`, bf16, 8 members, PROMPTS
#    prompts, TOKENS new tokens: ES efficiency against pure inference at the
#    same rows, decode tokens/s, update seconds, GPU peak.  Each run has its
#    own time limit (RUN_TIMEOUT), so one slow run cannot eat the loan.
# 3. The fp32 master in pinned host memory (es.master: host) against on the
#    card: 2 generations of `es-mpi train` on the first shape, 8 prompts x 16
#    tokens; the two final digests must be equal (master_host.txt).
# 4. A table of every run side by side, summary.json, and the scale model.
#
#   tools/gpu_check.sh [OUT_DIR]                       # everything (~10 min on one H200, estimated)
#   SHAPES=qwen2.5-1.5b tools/gpu_check.sh out         # one shape (each shape runs alone)
#   NOISE=lowrank BACKENDS=hf tools/gpu_check.sh out   # one kind, one backend
#   SHAPES=qwen2.5-tiny PROMPTS=4 TOKENS=8 PREFLIGHT_SHAPE=qwen2.5-tiny tools/gpu_check.sh out   # CPU smoke (tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
SHAPES=${SHAPES:-qwen2.5-1.5b qwen2.5-7b}
PROMPTS=${PROMPTS:-64}
TOKENS=${TOKENS:-128}
NOISE=${NOISE:-full lowrank}
BACKENDS=${BACKENDS:-hf vllm}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
PREFLIGHT_SHAPE=${PREFLIGHT_SHAPE:-qwen2.5-0.5b}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TQDM_DISABLE=1
mkdir -p "$OUT"
echo "== preflight ($(date +%T))"
"$PY" tools/gpu_preflight.py "$OUT/preflight.json" --shape "$PREFLIGHT_SHAPE" || { echo "preflight failed: see above"; exit 1; }
POP=$(awk '/^ *population:/ {print $2; exit}' configs/gpu_check.yaml)
for s in $SHAPES; do
  for n in $NOISE; do
    for b in $BACKENDS; do
      tag="$s-$n-$b"
      if [ "$b" = vllm ] && ! "$PY" -c "import vllm" 2>/dev/null; then
        echo "{\"skipped\": \"vllm is not installed (pip install 'es-mpi[vllm]')\"}" > "$OUT/$tag.json"
        echo "== $tag: skipped, vllm not installed"
        continue
      fi
      echo "== $tag ($(date +%T))"
      rows=0  # full: one member's prompts per tile; lowrank: every row of the rank in one batch
      [ "$n" = lowrank ] && rows=$((POP * PROMPTS))
      timeout "$RUN_TIMEOUT" "$PY" -m es_mpi bench --config configs/gpu_check.yaml \
        --set "model.path=builtin:$s-random" --set "es.prompts_per_generation=$PROMPTS" \
        --set "task.train_size=$PROMPTS" --set "generation.max_new_tokens=$TOKENS" \
        --set "es.noise=$n" --set "generation.batch_size=$rows" --set "generation.backend=$b" \
        --json "$OUT/$tag.json" 2>&1 | tee "$OUT/$tag.txt"
      rc=${PIPESTATUS[0]}
      if [ "$rc" != 0 ]; then
        echo "{\"failed\": \"exit $rc (124: past RUN_TIMEOUT=${RUN_TIMEOUT}s)\"}" > "$OUT/$tag.json"
        echo "== $tag: failed, exit $rc"
      fi
    done
  done
done
first=${SHAPES%% *}
echo "== master on host vs on the card, $first ($(date +%T))"
runs=$(mktemp -d)   # the runs' checkpoints (6 GB each at 1.5B) stay out of $OUT
for where in device host; do
  timeout "$RUN_TIMEOUT" "$PY" -m es_mpi train --config configs/gpu_check.yaml --run-dir "$runs/$where" \
    --set "model.path=builtin:$first-random" --set es.prompts_per_generation=8 --set task.train_size=8 \
    --set generation.max_new_tokens=16 --set es.generations=2 --set es.master=$where --set generation.backend=hf \
    > "$OUT/master-$where.txt" 2>&1
  echo "$where exit $? $(grep -o 'final-digest: [0-9a-f]*' "$OUT/master-$where.txt")" | tee -a "$OUT/master_host.txt"
done
rm -rf "$runs"
d1=$(grep -o 'final-digest: [0-9a-f]*' "$OUT/master-device.txt"); d2=$(grep -o 'final-digest: [0-9a-f]*' "$OUT/master-host.txt")
[ -n "$d1" ] && [ "$d1" = "$d2" ] && echo "master host == device: same final digest" | tee -a "$OUT/master_host.txt" \
  || echo "master host != device (or a run failed): see master-*.txt" | tee -a "$OUT/master_host.txt"
"$PY" - "$OUT" "$SHAPES" "$NOISE" "$BACKENDS" <<'PY'
import json, sys
out, shapes, kinds, backends = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
summary = {"preflight": json.load(open(f"{out}/preflight.json")), "runs": {}}
print(f"{'shape':<14} {'noise':<8} {'backend':<7} {'params':>14} {'ES eff':>7} {'tok/s':>9} {'update s':>9} "
      f"{'GPU peak GiB':>13}")
for s in shapes:
    for n in kinds:
        for b in backends:
            r = json.load(open(f"{out}/{s}-{n}-{b}.json"))
            summary["runs"][f"{s}-{n}-{b}"] = r
            if "es_efficiency" not in r:
                print(f"{s:<14} {n:<8} {b:<7} {r.get('skipped') or r.get('failed')}")
                continue
            peak = r.get("gpu_peak_bytes_bench") or r.get("gpu_peak_bytes_es")
            print(f"{s:<14} {n:<8} {b:<7} {r['n_params']:>14,} {r['es_efficiency']:>7.3f} "
                  f"{r['decode_tokens_per_s']:>9.1f} {r['breakdown_s']['t_update']:>9.2f} "
                  f"{peak / 2**30 if peak else float('nan'):>13.2f}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PY
last=${SHAPES##* }
jsons=$(for n in $NOISE; do f="$OUT/$last-$n-hf.json"; grep -q es_efficiency "$f" 2>/dev/null && echo "$f"; done)
[ -n "$jsons" ] && "$PY" tools/scale_model.py $jsons --out "$OUT/scale_model.png" | tee "$OUT/scale_model.txt"
exit 0
