#!/usr/bin/env bash
# One-shot GPU check (issue 7), written to run once on one H100/H200 through the device tool, or by hand on
# any CUDA machine:
#   1. `unic bench` on the UNIC-L configuration: teachers dinov2_g + metaclip_h (random init, bf16), student
#      vit_large_patch14_224 at 224 px (patch 14: a 16x16 grid; bf16 autocast), teacher dropping p=0.25, the
#      batch sizes in $SIZES tried in turn on the same models (under --compile each compiled afresh) -> images/s,
#      peak memory, split and MFU;
#      with BASELINE=DIR, the same bench first on the code in DIR (e.g. `git archive HEAD~1 | tar -x -C DIR`),
#      so before/after come from one machine (compiled, in the first mode, with COMPILE=1 SKIP_EAGER=1);
#      with COMPILE=1, the same bench again under `--compile`, once per
#      torch.compile mode in $COMPILE_MODES (default: "default"; e.g. "default max-autotune-no-cudagraphs");
#      SKIP_EAGER=1 leaves out the bench without --compile;
#      with PROFILE=1 each compiled bench also profiles one step (`--profile`: kernel time by kind, trace);
#      with ACCUM=K:B:MODE, one more compiled bench with K micro-batches of B per step in torch.compile's MODE
#      (e.g. 2:96:reduce-overhead, the CUDA-graph path of gradient accumulation);
#   2. the distill, teacher-precision and compile tests on CUDA (UNIC_TEST_DEVICE=cuda; test_compile.py's
#      CUDA-graph accumulation test runs only on a GPU), or the tests named in $TESTS; SKIP_BENCH=1 runs only them.
# The summary goes to $OUT/summary.txt (the device tool's folder, or ./gpu_out), everything else (JSON, logs,
# op tables, gzipped traces) into $OUT/gpu_results.tar.gz, re-packed after each part: the device tool returns at
# most 8 files. Every knob is an environment variable, so the same script was tried on the CPU with tiny models:
#   PYTHON=.venv/bin/python DEVICE=cpu TEACHERS="timm:test_vit timm:test_vit2" STUDENT=test_vit IMAGE=64 \
#     SIZES=2,4 STEPS=1 SKIP_TESTS=1 COMPILE=1 COMPILE_MODES="default max-autotune-no-cudagraphs" PROFILE=1 \
#     bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu_results.tar.gz" -C "$WORK" . ; }
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TEACHERS=${TEACHERS:-dinov2_g metaclip_h}
STUDENT=${STUDENT:-vit_large_patch14_224}
IMAGE=${IMAGE:-224}
SIZES=${SIZES:-128}
STEPS=${STEPS:-4}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SITE=""
if [ -d .gpu7/whl ] && [ "$DEVICE" != cpu ]; then  # timm/open_clip/tomli_w/ftfy wheels carried to the device
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu7/whl/*.whl && SITE=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${SITE:+:$SITE}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip',
open_clip.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$WORK/env.txt"

summarise() {  # one line per batch size of a bench JSON
  "$PY" - "$1" <<'PYEOF'
import json, sys
text = open(sys.argv[1]).read().strip()
if not text:
    sys.exit(f"{sys.argv[1]}: no bench result")
r = json.loads(text.splitlines()[-1])
for s in r.get("sweep", [r]):
    if s.get("oom"):
        print(f"batch {s['batch_size']}: out of memory")
        continue
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
    split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in s["split_sec_per_step"].items())
    print(f"batch {s['batch_size']}: {s['sec_per_step']:.3f} s/step, {s['images_per_sec']:.1f} img/s, "
          f"{s['achieved_flops_per_sec'] / 1e12:.1f} TFLOP/s, MFU {mfu}, peak {s['peak_mem_bytes'] / 2**30:.1f} GiB"
          f" | {split} | loss {s.get('loss', float('nan')):.4f}")
print(f"{r['device']}: {r['flops_per_image']['train_step'] / 1e9:.0f} GFLOP/image; best batch {r['batch_size']}")
if prof := r.get("profile"):
    total = prof["total_sec"] or 1
    print(f"profile at batch {prof['batch_size']} ({prof['clock']} {total:.3f} s): "
          + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in prof["by_kind_sec"].items()))
    for top in prof["top"][:8]:
        print(f"  {top['sec'] * 1000:8.1f} ms x{top['count']:<5} {top['name'][:100]}")
PYEOF
}

bench() {  # NAME CODE_DIR TIMEOUT [extra flags...]
  local name=$1 code=$2 limit=$3; shift 3
  local start=$SECONDS
  # shellcheck disable=SC2086  # TEACHERS is a list
  # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this checkout) ahead of $code, and a
  # BASELINE would time this code again (it did until session 9); the line below names the code that runs
  echo "== $name: unic_cli from $(PYTHONSAFEPATH=1 PYTHONPATH=$code "$PY" -c 'import unic_cli; print(unic_cli.__file__)')"
  PYTHONSAFEPATH=1 PYTHONPATH=$code${SITE:+:$SITE} timeout "$limit" "$PY" -m unic_cli bench --teachers $TEACHERS --student "$STUDENT" \
    --image-size "$IMAGE" --device "$DEVICE" --teacher-drop-prob 0.25 --try-batch-sizes "$SIZES" --steps "$STEPS" \
    --warmup "${WARMUP:-2}" --json "$@" > "$WORK/bench_$name.json" 2> "$WORK/bench_$name.err"
  echo "== $name: exit code $? after $((SECONDS - start)) s"
  tail -c 600 "$WORK/bench_$name.err"
  summarise "$WORK/bench_$name.json"
  [ -f "$WORK/profile_$name/trace.json" ] && gzip "$WORK/profile_$name/trace.json"
  pack
}

if [ -z "${SKIP_BENCH:-}" ]; then
  if [ -n "${BASELINE:-}" ]; then
    if [ -n "${SKIP_EAGER:-}" ] && [ -n "${COMPILE:-}" ]; then  # compiled against compiled, in the first mode
      modes=${COMPILE_MODES:-default}
      WARMUP=3 bench baseline_compile "$(cd "$BASELINE" && pwd)" "${COMPILE_TIMEOUT:-240}" --compile \
        --compile-mode "${modes%% *}"
    else
      bench baseline "$(cd "$BASELINE" && pwd)" "${BENCH_TIMEOUT:-100}"
    fi
  fi
  [ -z "${SKIP_EAGER:-}" ] && bench unic_l "$PWD" "${BENCH_TIMEOUT:-100}"
  if [ -n "${COMPILE:-}" ]; then
    for mode in ${COMPILE_MODES:-default}; do
      WARMUP=3 bench "compile_$mode" "$PWD" "${COMPILE_TIMEOUT:-240}" --compile --compile-mode "$mode" \
        ${PROFILE:+--profile "$WORK/profile_compile_$mode"}
    done
  fi
  if [ -n "${ACCUM:-}" ]; then  # ACCUM=K:B:MODE, e.g. 2:96:reduce-overhead: K micro-batches of B, compiled in MODE
    IFS=: read -r k b mode <<< "$ACCUM"
    SIZES=$b WARMUP=3 bench "accum${k}_$mode" "$PWD" "${ACCUM_TIMEOUT:-180}" --compile --compile-mode "$mode" \
      --grad-accum-steps "$k"
  fi
fi 2>&1 | tee "$OUT/summary.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  UNIC_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" \
    ${TESTS:-tests/test_distill.py tests/teachers/test_precision.py tests/teachers/test_timm.py tests/test_compile.py} 2>&1 \
    | tail -n 15 | tee "$WORK/pytest_cuda.txt" | tee -a "$OUT/summary.txt"
fi
pack
