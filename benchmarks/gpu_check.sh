#!/usr/bin/env bash
# On a lent H100/H200 (the device tool), from the repository root, in under 8 minutes:
#   here:  bash benchmarks/gpu_wheels.sh            (once: the wheels the GPU image lacks)
#   there: bash benchmarks/gpu_check.sh             (carry .whl; results under $OUT)
# 1. benchmarks/attention.py: pallas vs cudnn vs xla, time and error against fp32 XLA, at
#    CWM's and Enigma's shapes; 2. benchmarks/mfu.py on cwm_1b_1gpu and enigma_1b_1gpu as
#    committed, each printing its measured step beside plan mode's roofline estimate of the
#    same executable; 3. a summary table of measured vs predicted step time.
# Each step has its own time limit and a failure does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
kind=$(python3 -c 'import jax; print(jax.devices()[0].device_kind)')
case "$kind" in *H200*) gpu=H200-SXM-141GB ;; *) gpu=H100-SXM-80GB ;; esac

timeout 180 python3 benchmarks/attention.py --repeats=5 \
  --shapes=cwm_1b_10k,cwm_10k,enigma_local,enigma_global,enigma_decode 2>&1 \
  | grep -v '^W[0-9]' | tee "$OUT/attention.md"

for experiment in cwm_1b_1gpu enigma_1b_1gpu; do
  timeout 140 python3 benchmarks/mfu.py --experiment=$experiment --steps=5 --repeats=3 \
    --config.cluster.gpu=$gpu 2>&1 | grep -v '^W[0-9]' | tee "$OUT/mfu_$experiment.txt"
done

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print('\n| experiment | attention, remat | measured step s | predicted s (hidden .. not) | '
      'measured / predicted | MFU | compiled/model |')
print('|---|---|---|---|---|---|---|')
for path in sorted(out.glob('mfu_*.txt')):
  lines = [l for l in path.read_text().splitlines() if l.startswith('RESULT ')]
  if not lines:
    print(f'| {path.stem[4:]} | failed: see {path.name} |')
    continue
  r = json.loads(lines[-1][7:])
  fast, slow = r.get('predicted_step_s', [float('nan')] * 2)
  print(f"| {r['experiment']} | {r['attention']}, {r['remat']} | {r['step_s']:.4f} | "
        f"{fast:.4f} .. {slow:.4f} | {r['step_s'] / fast:.2f} | {r['mfu']:.3f} | "
        f"{r['compiled_flops_per_step'] / r['model_flops_per_step']:.2f} |")
PY
