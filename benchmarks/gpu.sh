#!/usr/bin/env bash
# Train-step and attention benchmarks on one NVIDIA GPU, one command, < 8 min.
#
#   bash benchmarks/gpu.sh                     # from a fresh clone, repo root
#   OUT=gpu_bench WHEELS=/path/to/wheelhouse bash benchmarks/gpu.sh   # offline
#
# 1. venv (.venv, or $VENV) with the pinned CPU requirements, then
#    jax[cuda12]==0.10.2 on top (requirements.txt pins CPU jax only). With
#    $WHEELS set, pip installs from that folder only (machines without
#    internet: prepare it elsewhere with `pip download -r requirements.txt
#    "jax[cuda12]==0.10.2" -d wheelhouse`).
# 2. records the card (nvidia-smi) and jax's view of it.
# 3. benchmarks/train_step.py, paper-like config (configs/paper.py:synth,
#    224x224 ResNet-18, T=16, batch 128) in bfloat16 then float32, with a
#    jax.profiler trace of 3 steps each in $OUT/profile (open with
#    TensorBoard's profile plugin or Perfetto to see what limits MFU).
# 4. benchmarks/attention_scaling.py (forward): its sharded paths need 8
#    devices, so it runs on 8 fake CPU devices of this host, as designed;
#    memory figures are XLA's and exact, times are this host's CPU.
# 5. prints one summary table; everything is also in $OUT.
# Stages have time limits so the whole run stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bench}
VENV=${VENV:-.venv}
mkdir -p "$OUT"
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*"; }

stage "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV" || exit 1; fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PIP=(pip install -q --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
if ! python -c 'import jax_cuda12_plugin' 2>/dev/null; then
  "${PIP[@]}" -r requirements.txt || exit 1
  "${PIP[@]}" --no-deps -e . || exit 1
  "${PIP[@]}" "jax[cuda12]==0.10.2" || exit 1
fi

stage "card"
nvidia-smi --query-gpu=name --format=csv | tee "$OUT/gpu_name.csv"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
  --format=csv | tee "$OUT/gpu.csv"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee "$OUT/jax_devices.txt"
if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "jax does not see a GPU (see above); stopping." >&2
  exit 1
fi

stage "train step, paper-like config, bf16 + fp32 (limit 270 s)"
# Let XLA take most of the card: batch 128 of 224x224 clips is large in fp32.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
timeout 270 python benchmarks/train_step.py --configs=paper \
  --dtype=bfloat16,float32 --steps=20 --warmup=3 --max_seconds=40 \
  --json_out="$OUT/train_step.json" --profile_dir="$OUT/profile" \
  2>"$OUT/train_step.stderr" | tee "$OUT/train_step.txt"
echo "train_step exit status ${PIPESTATUS[0]} (124 = time limit)"

stage "attention scaling, T=16..1024, 8 fake CPU devices (limit 120 s)"
unset XLA_PYTHON_CLIENT_MEM_FRACTION
JAX_PLATFORMS=cpu timeout 120 python benchmarks/attention_scaling.py \
  2>"$OUT/attention.stderr" | tee "$OUT/attention.txt"
echo "attention_scaling exit status ${PIPESTATUS[0]} (124 = time limit)"

stage "summary"
python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
card = (out / 'gpu_name.csv').read_text().splitlines()[-1].strip()
print(f'\n## {card}: one table (target: paper-like bf16 MFU >= 40%)\n')
print('| benchmark | setting | figure |')
print('|---|---|---|')
try:
  ts = json.loads((out / 'train_step.json').read_text())
  print(f"| peak used for MFU | per device | {ts['peak_tflops_per_device']:.0f} "
        f"TFLOP/s ({ts['peak_source']}) |")
  print(f"| measured matmul | fp32 / bf16 8192^2 | {ts['matmul_tflops_float32']:.0f}"
        f" / {ts['matmul_tflops_bfloat16']:.0f} TFLOP/s |")
  for r in ts['rows']:
    what = f"train step {r['config']} {r['dtype']}"
    if 'error' in r:
      print(f"| {what} | | FAILED {r['error'][:120]} |")
      continue
    verdict = ''
    if r['dtype'] == 'bfloat16':
      verdict = ' (target met)' if r['mfu'] >= 0.40 else ' (target NOT met)'
    print(f"| {what} | B={r['batch']} T={r['frames']} {r['image_size']}px | "
          f"{r['step_s'] * 1e3:.1f} ms/step, {r['clips_per_s']:.1f} clips/s, "
          f"{r['flops_per_step'] / 1e12:.2f} TFLOP/step, {r['tflops']:.1f} "
          f"TFLOP/s, MFU {100 * r['mfu']:.1f}%{verdict} |")
except FileNotFoundError:
  print('| train step | | no results (see train_step.stderr) |')
lines = (out / 'attention.txt').read_text().splitlines() if (out / 'attention.txt').exists() else []
rows = [l for l in lines if l.strip().startswith('1024 |')]
for l in rows:
  mem, ms = l.split('|')[1].split(), l.split('|')[2].split()
  names = ('plain', 'blockwise', 'ring', 'a2a')
  print('| attention T=1024 (CPU) | MiB/device | ' +
        ', '.join(f'{n} {m}' for n, m in zip(names, mem)) + ' |')
  print('| attention T=1024 (CPU) | ms | ' +
        ', '.join(f'{n} {m}' for n, m in zip(names, ms)) + ' |')
for l in lines:
  if l.startswith(('blockwise memory growth', 'T=1024:')):
    print(f'| attention | | {l} |')
if not rows:
  print('| attention | | no T=1024 row (see attention.stderr) |')
EOF
stage "done; files in $OUT"
