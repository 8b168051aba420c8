#!/usr/bin/env bash
# One-shot GPU check (issue 7), written to run once on one H100/H200 through the device tool, or by hand on
# any CUDA machine:
#   1. `unic bench` on the UNIC-L configuration: teachers dinov2_g + metaclip_h (random init, bf16), student
#      vit_large_patch14_224 at 224 px (patch 14: a 16x16 grid; bf16 autocast), teacher dropping p=0.25, the
#      batch sizes in $SIZES tried in turn on the same models -> images/s, peak memory, split and MFU;
#   2. the distill tests on CUDA: UNIC_TEST_DEVICE=cuda pytest -q tests/test_distill.py.
# Results go to $OUT (the device tool's folder) or ./gpu_out. Every knob is an environment variable, so the
# same script was tried on the CPU with tiny models first:
#   PYTHON=.venv/bin/python DEVICE=cpu TEACHERS="timm:test_vit timm:test_vit2" STUDENT=test_vit IMAGE=64 \
#     SIZES=2,4 STEPS=1 SKIP_TESTS=1 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TEACHERS=${TEACHERS:-dinov2_g metaclip_h}
STUDENT=${STUDENT:-vit_large_patch14_224}
IMAGE=${IMAGE:-224}
SIZES=${SIZES:-64,128,256,384}
STEPS=${STEPS:-4}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .gpu7/whl ] && [ "$DEVICE" != cpu ]; then  # timm/open_clip/tomli_w/ftfy wheels carried to the device
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu7/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip',
open_clip.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
# shellcheck disable=SC2086  # TEACHERS is a list
timeout "${BENCH_TIMEOUT:-85}" "$PY" -m unic_cli bench --teachers $TEACHERS --student "$STUDENT" --image-size "$IMAGE" \
  --device "$DEVICE" --teacher-drop-prob 0.25 --try-batch-sizes "$SIZES" --steps "$STEPS" --warmup 2 --json \
  > "$OUT/bench_unic_l.json" 2> "$OUT/bench_unic_l.err"
echo "bench exit code $?"
tail -c 2000 "$OUT/bench_unic_l.err"
"$PY" - "$OUT/bench_unic_l.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read().strip()
if not text:
    sys.exit("no bench result")
r = json.loads(text.splitlines()[-1])
for s in r.get("sweep", [r]):
    if s.get("oom"):
        print(f"batch {s['batch_size']}: out of memory")
        continue
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
    split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in s["split_sec_per_step"].items())
    print(f"batch {s['batch_size']}: {s['sec_per_step']:.3f} s/step, {s['images_per_sec']:.1f} img/s, "
          f"{s['achieved_flops_per_sec'] / 1e12:.1f} TFLOP/s, MFU {mfu}, peak {s['peak_mem_bytes'] / 2**30:.1f} GiB"
          f" | {split}")
print(f"{r['device']}: {r['flops_per_image']['train_step'] / 1e9:.0f} GFLOP/image; best batch {r['batch_size']}")
EOF
fi

if [ -z "${SKIP_TESTS:-}" ]; then
  UNIC_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-55}" "$PY" -m pytest -q -x tests/test_distill.py 2>&1 \
    | tail -n 15 | tee "$OUT/pytest_distill.txt"
fi

# Optional: the top GPU kernels of one UNIC-L step (PROFILE=1), and the step under torch.compile (COMPILE=1).
if [ -n "${PROFILE:-}" ]; then
  timeout "${PROFILE_TIMEOUT:-60}" "$PY" - "$TEACHERS" "$STUDENT" "$IMAGE" "$DEVICE" "${PROFILE_BATCH:-128}" \
    2>&1 <<'EOF2' | tee "$OUT/profile.txt"
import contextlib, sys, torch
from unic_cli import distill
from unic_cli.bench import _synthetic_batches
from unic_cli.config import BenchConfig
from unic_cli.distributed import dist_info
teachers, student, image, device, batch = sys.argv[1].split(), sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
config = BenchConfig.from_sources(None, dict(teachers=tuple(teachers), student=student, image_size=image, device=device,
                                             batch_size=batch, teacher_drop_prob=0.25, random_init_teachers=True))
tr = distill.build_trainer(config, torch.device(device), dist_info(), init_on_device=True)
batches, null = _synthetic_batches(batch, image, 0), lambda name: contextlib.nullcontext()
def step():
    tr.optimizer.zero_grad(set_to_none=True)
    distill.forward_backward(tr, batches, 0.5, null)
    distill.optimizer_step(tr, null)
for _ in range(2):
    step()
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
with torch.profiler.profile(activities=acts) as prof:
    step()
    torch.cuda.synchronize() if device == "cuda" else None
key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
EOF2
fi
if [ -n "${COMPILE:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${COMPILE_TIMEOUT:-120}" "$PY" -m unic_cli bench --teachers $TEACHERS --student "$STUDENT" --image-size "$IMAGE" \
    --device "$DEVICE" --teacher-drop-prob 0.25 --batch-size "${COMPILE_BATCH:-256}" --steps "$STEPS" --warmup 3 --compile \
    --json > "$OUT/bench_compile.json" 2> "$OUT/bench_compile.err"
  echo "compile bench exit code $?"; tail -c 1500 "$OUT/bench_compile.err"; cut -c1-400 "$OUT/bench_compile.json"
fi
