#!/usr/bin/env bash
# Issue 6 on a machine with 2 GPUs (or, with GPU=0, on CPU with gloo as a dry run): every check of
# tests/integration/test_parallel_layouts.py through NCCL, one process per GPU, plus throughput and peak
# memory per GPU. Logs and summary.json go to $OUT; the last lines printed are the summary table.
#
#   OUT=/tmp/out SIZE=gpu bash benchmarks/multi_gpu_layouts.sh        # on the GPU machine
#   OUT=/tmp/out SIZE=tiny GPU=0 PY=.venv/bin/python bash benchmarks/multi_gpu_layouts.sh   # CPU dry run
set -u
OUT=${OUT:?set OUT to the folder for logs and summary.json}
SIZE=${SIZE:-gpu}
GPU=${GPU:-1}
PY=${PY:-python3}
STEPS=${STEPS:-3}
LAYOUTS=${LAYOUTS:-dp2,tp2,tp2fused,ep2,pp2,tp2ep2}  # tp2fused: the fused loss under TP=2
WORK=${WORK:-/tmp/multi_gpu_layouts}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
PROBE=tests/integration/parallel_probe.py
FLAGS="--out $WORK --size $SIZE --steps $STEPS"
[ "$GPU" = 1 ] && FLAGS="$FLAGS --gpu"
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"

step() {  # step NAME LIMIT_S COMMAND...: run (killed after LIMIT_S), keep the log, report status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s"
}

[ "$GPU" = 1 ] && nvidia-smi --query-gpu=index,name,memory.total --format=csv
step prepare 150 "$PY" $PROBE prepare $FLAGS --threads 8
step split 180 bash -c "$PY $PROBE convert-part $FLAGS --part 1 --parts 2 --threads 4 & \
  RANK=0 $PY $PROBE convert-part $FLAGS --part 0 --parts 2 --threads 4; wait"
step compare 60 "$PY" $PROBE compare-ckpt $FLAGS
step reference 180 env CUDA_VISIBLE_DEVICES=0 "$PY" $PROBE reference $FLAGS --threads 8
step layouts 420 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 $PROBE layouts $FLAGS --threads 8 \
  --layouts "$LAYOUTS"
step verify 90 env CUDA_VISIBLE_DEVICES=0 "$PY" $PROBE verify $FLAGS --layout "${LAYOUTS##*,}" --threads 8
"$PY" benchmarks/multi_gpu_summary.py "$OUT"
