#!/usr/bin/env bash
# ResNet-50 @ 224 px ContrastiveModel train step on one GPU: bf16 and fp32, XLA on and off.
# Prints one JSON line per configuration, then images/s and MFU (bench/gpu_report.py).
#
#   bash bench/gpu.sh                       # from the repository root
#
# Designed to finish in under 8 minutes including the install: a global deadline
# (BENCH_BUDGET_S, default 460 s) is shared by the install and the four configurations; each
# configuration runs in its own child process under a timeout, a failed or timed-out one is
# reported and the next one still runs. Nothing here needs the CPU-only benchmarks.
#
# Environment knobs:
#   BENCH_BUDGET_S=460        whole-script deadline (s)
#   BENCH_BATCH=128           pairs per step (256 images through the encoder)
#   BENCH_STEPS=20 BENCH_WINDOW=5 BENCH_WARMUP=3   timed steps, steps per timed window, warm-up
#   BENCH_SKIP_INSTALL=1      use the current python as is (must already see the GPU)
#   BENCH_VENV=~/.venv-micle-gpu   venv created for the GPU wheel when an install is needed
#   BENCH_OUT=<file>          JSON lines of this run (default $OUT/bench_gpu_<time>.jsonl when
#                             $OUT is a folder, else /tmp/bench_gpu_<time>.jsonl)
#   BENCH_BACKBONE=resnet50 BENCH_SIZE=224   (smaller values only to smoke-test the script)
#   BENCH_PEAK_TFLOPS_BF16 / _FP32 / _TF32   peaks for a GPU missing from the table
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-460}
BATCH=${BENCH_BATCH:-128}
STEPS=${BENCH_STEPS:-20}
WINDOW=${BENCH_WINDOW:-5}
WARMUP=${BENCH_WARMUP:-3}
BACKBONE=${BENCH_BACKBONE:-resnet50}
SIZE=${BENCH_SIZE:-224}
# $OUT, when it is a folder (as on a lent device machine), receives the JSON lines.
if [ -d "${OUT:-}" ]; then JSONL_DIR=$OUT; else JSONL_DIR=${TMPDIR:-/tmp}; fi
JSONL=${BENCH_OUT:-$JSONL_DIR/bench_gpu_$(date +%Y%m%d_%H%M%S).jsonl}
VENV=${BENCH_VENV:-$HOME/.venv-micle-gpu}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export MICLE_BENCH_DATA=${MICLE_BENCH_DATA:-/tmp/micle_bench_data}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "# [gpu.sh +$(( $(date +%s) - START ))s] $*" >&2; }

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
log "GPU: ${GPU_NAME:-none found by nvidia-smi}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
  --format=csv 2>/dev/null >&2 || true

sees_gpu() {  # $1 = python: exit 0 when TensorFlow in it lists a GPU
  timeout 120 "$1" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" >/dev/null 2>&1
}

PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && sees_gpu "$VENV/bin/python"; then
  PY="$VENV/bin/python"
  log "reusing $VENV (TensorFlow sees the GPU)"
elif [ "${BENCH_SKIP_INSTALL:-0}" = "1" ] || sees_gpu "$PY"; then
  log "using $PY as is (BENCH_SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0})"
else
  # setup.py pins tensorflow-cpu on x86_64, and tensorflow-cpu and tensorflow share one
  # package directory: never install both. So: the repo's other requirements + the CUDA
  # wheel, then the repo itself with --no-deps (and tensorflow-cpu removed if present).
  log "installing tensorflow[and-cuda]==2.21.* into $VENV (deadline $(left)s left)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || { log "venv failed"; exit 1; }
  PY="$VENV/bin/python"
  REQS=$("$PY" - <<'EOF'
import re
text = open("setup.py").read()
block = re.search(r"install_requires=\[(.*?)\]", text, re.S).group(1)
reqs = [r for r in re.findall(r'"([^"]+)"', block) if not r.startswith("tensorflow-cpu")
        and not r.startswith("tensorflow==")]
print("\n".join(reqs + ["tensorflow[and-cuda]==2.21.*"]))
EOF
)
  "$PY" -m pip uninstall -y -q tensorflow-cpu >/dev/null 2>&1 || true
  mapfile -t REQ_ARR <<<"$REQS"
  timeout $(( $(left) - 150 > 60 ? $(left) - 150 : 60 )) \
    "$PY" -m pip install -q --disable-pip-version-check "${REQ_ARR[@]}" \
    || log "pip install of the requirements failed or timed out (continuing)"
  "$PY" -m pip install -q --no-deps --disable-pip-version-check -e . \
    || log "pip install -e . failed (continuing: bench runs from the source tree)"
  if ! sees_gpu "$PY"; then
    log "TensorFlow in $PY does not see a GPU; the configurations below will run on CPU or fail"
  fi
fi
"$PY" -c "import tensorflow as tf, keras; print('# tf', tf.__version__, 'keras', keras.__version__, 'gpus', tf.config.list_physical_devices('GPU'), 'cuda', tf.sysconfig.get_build_info().get('cuda_version'))" >&2 || true

# bf16 + XLA first: the headline number survives a shortage of time.
CONFIGS=("bf16 on" "fp32 on" "bf16 off" "fp32 off")
n=${#CONFIGS[@]}
i=0
for cfg in "${CONFIGS[@]}"; do
  read -r prec jit <<<"$cfg"
  remaining=$(left)
  # Leave 60 s for each configuration still to come; time one does not use rolls over.
  per=$(( remaining - 60 * (n - i - 1) ))
  [ $per -gt 200 ] && per=200
  i=$((i + 1))
  if [ $per -lt 45 ]; then
    log "skipping $prec xla=$jit: only ${remaining}s left"
    echo "{\"bench\": \"train_step\", \"config\": {\"backbone\": \"$BACKBONE\", \"image_size\": $SIZE, \"batch_size\": $BATCH, \"precision\": \"$prec\", \"jit\": $([ "$jit" = on ] && echo true || echo false)}, \"error\": \"skipped: out of time\"}" | tee -a "$JSONL"
    continue
  fi
  log "$BACKBONE@$SIZE batch $BATCH $prec xla=$jit (timeout ${per}s)"
  # The child gets `per - 5`; the outer timeout is a backstop if the parent itself hangs.
  timeout $(( per + 10 )) "$PY" -m bench.train_step --backbones="$BACKBONE" --sizes="$SIZE" \
    --batch_sizes="$BATCH" --precisions="$prec" --jit="$jit" --steps="$STEPS" \
    --window="$WINDOW" --warmup="$WARMUP" --max_timed_s=40 --timeout=$(( per - 5 )) \
    --pipeline_ratio=false --flops=false --jsonl="$JSONL" | grep -v '^#' | grep '^{' \
    || log "$prec xla=$jit: no result (see above)"
done

# Optional extra (only with time to spare): the derm photometric ops batched on the device,
# i.e. what --augment_placement=device adds to each step (bench/README.md, part 5).
if [ "$(left)" -gt 45 ]; then
  log "device-placed derm augmentation, batch $BATCH @ $SIZE (timeout $(( $(left) - 15 ))s)"
  timeout $(( $(left) - 15 )) "$PY" -m bench.gpu_augment --batch_size="$BATCH" \
    --image_size="$SIZE" --jsonl="$JSONL" | grep '^#' || log "gpu_augment: no result"
fi

"$PY" -m bench.gpu_report --jsonl="$JSONL" ${GPU_NAME:+--gpu_name="$GPU_NAME"}
log "done in $(( $(date +%s) - START ))s; JSON lines in $JSONL"
