#!/usr/bin/env bash
# The CUDA path checked end to end on one GPU in at most 9 minutes (the always-run steps' limits add up to 540 s); every result lands in $OUT (default gpu_out/):
# summary.txt, one log per step, probe.json, bench_*.json, results.json. From the repo root:
#   bash scripts/gpu_validate.sh              # on the GPU machine (the torch it has; Hydra from wheels if missing)
#   bash scripts/gpu_validate.sh --dry-run    # the same steps on this CPU at toy sizes (what CI runs): it works
# Needs the CIFAR-10 JPEG copy at data/cifar10-jpeg, or the archive at $CIFAR_TGZ, shared/data or ../shared/data.
# No `pip install -e .` on the GPU machine: it would replace the image's torch. snapens runs from the checkout
# (PYTHONPATH); Hydra, OmegaConf and antlr4 are pure Python wheels unzipped from $WHEELS when the image lacks them.
set -u
DRY=false; [ "${1:-}" = "--dry-run" ] && DRY=true && BUDGET=${BUDGET:-3600}  # a slow CPU skips nothing
PY=$(command -v python || command -v python3)
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
step() { local name=$1 limit=$2; shift 2; echo "== $name (t=${SECONDS}s)" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "   rc=$rc $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)" | tee -a "$OUT/summary.txt"; }
left() { [ $((SECONDS + $1)) -lt "${BUDGET:-540}" ]; }   # start an optional step only if it can finish

# 0. environment
if ! $PY -c 'import hydra, omegaconf' 2>/dev/null; then
  for w in "${WHEELS:-gpu/wheels}" ../shared/gpu/wheels shared/gpu/wheels; do
    [ -d "$w" ] && mkdir -p /tmp/pydeps && for f in "$w"/*.whl; do $PY -m zipfile -e "$f" /tmp/pydeps; done && break
  done
  export PYTHONPATH=$PYTHONPATH:/tmp/pydeps
fi
$PY -c 'import torch, hydra, omegaconf; print("torch", torch.__version__, "hydra", hydra.__version__)' \
  | tee -a "$OUT/summary.txt"
if $DRY; then
  DEVICE=cpu; DATA=(data=synthetic); ROOT_ARGS=(); QUICK=(--quick --threads 1); ENS=(--quick --threads 1 --images 128)
  SHORT=(model=resnet20 model.depth=8 data.train_size=300 data.test_size=128 trainer.batch_size=64)  # 44 left over
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
  if [ ! -d data/cifar10-jpeg/train ]; then
    for t in "${CIFAR_TGZ:-}" shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
      [ -f "$t" ] && mkdir -p data && tar xzf "$t" -C data && break; done
  fi
  DEVICE=cuda; DATA=(data=imagefolder data.root=$PWD/data/cifar10-jpeg); ROOT_ARGS=(--root "$PWD/data/cifar10-jpeg")
  QUICK=(--steps 50 --warmup 10 --repeats 3); ENS=(--repeats 3); SHORT=()
fi

# 1. probes without Hydra: sync-free loop, SWA syncs, RNG round trip, run-to-run bits, cudnn.benchmark
# CUBLAS_WORKSPACE_CONFIG before CUDA starts, for the probe of deterministic mode
PROBE_DEVICE=$DEVICE CUBLAS_WORKSPACE_CONFIG=:4096:8 step probe 90 $PY scripts/gpu_probe.py
# 2. the gpu-marked tests (skipped on a CPU)
step pytest_gpu 60 $PY -m pytest -q -o addopts= -p no:cacheprovider -m gpu tests/test_gpu.py  # no xdist needed
# 3. training throughput against the plain loop (bf16 on CUDA, channels_last); s/epoch = 50000 / img/s
MODELS=resnet20,wrn16_4,wrn28_10; $DRY && MODELS=resnet20
step bench_train 150 $PY scripts/bench_train.py "${ROOT_ARGS[@]}" --device $DEVICE "${QUICK[@]}" \
  --models $MODELS --json "$OUT/bench_train.json"
# 4. ensemble evaluation (ResNet-20, M=5, 10,000 images on CUDA)
step bench_ensemble 90 $PY scripts/bench_ensemble.py "${ROOT_ARGS[@]}" --device $DEVICE "${ENS[@]}" \
  --json "$OUT/bench_ensemble.json"
# 5. a short c10_fast: compiled, bf16 on CUDA, 3 cycles of 1 epoch; the partial batch is dropped, so one graph
RUN=$OUT/c10_short; rm -rf "$RUN"
TORCH_LOGS=recompiles step c10_short 150 $PY -m snapens.train experiment=c10_fast "${DATA[@]}" "${SHORT[@]}" \
  trainer.device=$DEVICE trainer.epochs=3 scheduler.cycles=3 hydra.run.dir="$RUN"
echo "   recompiles: $(grep -c 'Recompiling function' "$OUT/c10_short.log")" | tee -a "$OUT/summary.txt"
# 6. the same snapshots evaluated in fp32 and bf16: accuracy / NLL / ECE differences
left 60 && step ensemble_fp32 60 $PY -m snapens.ensemble run="$RUN" device=$DEVICE precision=fp32 out="$OUT/ens_fp32"
left 60 && step ensemble_bf16 60 $PY -m snapens.ensemble run="$RUN" device=$DEVICE precision=bf16 out="$OUT/ens_bf16"
# 7. if time is left: compiled ResNet-20 (no partial batch under compile, so no recompile while timed)
$DRY || { left 130 && step bench_compile 130 $PY scripts/bench_train.py "${ROOT_ARGS[@]}" --device cuda \
  --train-limit 50000 "${QUICK[@]}" --models resnet20 --compile --json "$OUT/bench_compile.json"; }
echo "done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
grep -q "rc=[1-9]" "$OUT/summary.txt" && { echo "some steps failed: see $OUT/*.log"; exit 1; }
exit 0
