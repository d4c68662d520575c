#!/usr/bin/env bash
# The checks that need a GPU, in one script for a lent GPU machine (none in CI, none on the dev CPU).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [DEVICE]      # DEVICE: cuda (default); cpu for a dry run of the plumbing
#   (about 8 minutes on one H200, most of it compiling and the fine-tuning run)
#
# 1. vitlab's pretrained loaders against timm, torchvision and transformers themselves
#    (benchmarks/reference_equivalence.py: on the dev CPU timm and torchvision do not import)
# 2. the engine on the GPU: bf16, fp16 with loss scaling, torch.compile, resume, eval, predict,
#    visualize, torchrun (nccl)
# 3. throughput on the GPU: ViT-Tiny CIFAR (table, scaling plot, memory)
# 4. `vitlab finetune` of a ViT-B/16 on Flowers102-sized stand-ins: seconds per epoch
# 5. the shapes demo to its accuracy on the GPU, and the throughput of ViT-B/16 at 224
# Everything prints to stdout (tee it); results land in OUT_DIR. Each step has its own time limit and a
# failing step does not stop the others; the exit status counts the failed steps.
# ONLY="finetune bench-tiny" runs just the steps named.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [cuda|cpu]}
DEV=${2:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
R=$(mktemp -d)
FAILED=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "=== $name"
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}
V="$PY -m vitlab"
Q="--data shapes --debug --epochs 2 --run.device $DEV --out $R"

step env 30 $PY -c "import torch, platform; print(platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step reference 150 $PY benchmarks/reference_equivalence.py --out "$OUT"

step train-auto 120 $V train $Q --run.name auto
if [ "$DEV" = cuda ]; then step train-fp16 120 $V train $Q --precision fp16 --run.name fp16; fi
step train-compiled 150 $V train $Q --run.compile true --run.name compiled
step stop-after-1 120 $V train $Q --epochs 3 --run.stop_after 1 --run.name resumed
step resume 120 $V train --resume "$R/resumed"
step eval 60 $V eval --checkpoint "$R/auto" --tta flip-shift
$PY -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (32, 32), 'black'); \
ImageDraw.Draw(im).ellipse((6, 6, 26, 26), fill='white'); im.save('$R/circle.png')"
step predict 60 $V predict --checkpoint "$R/auto" "$R/circle.png"
step visualize 120 $V visualize --checkpoint "$R/auto" --samples 2 --out "$R/viz"
if [ "$DEV" = cuda ]; then
  step torchrun-nccl 180 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m vitlab train $Q --run.name ddp
fi

step bench-tiny 200 $PY benchmarks/throughput.py --device "$DEV" --memory --scaling --out "$OUT/vit_tiny"
step finetune 300 $PY benchmarks/finetune_speed.py --epochs 3 --out "$OUT/finetune" -- --run.device "$DEV"
step demo 150 $V train --config shapes --run.device "$DEV" --out "$R" --run.name demo
cp "$R/demo/metrics.jsonl" "$OUT/shapes_demo_metrics.jsonl" 2>/dev/null
step bench-base 300 $PY benchmarks/throughput.py --device "$DEV" --model vit_base_patch16_224 --batch-size 64 \
  --out "$OUT/vit_base"
echo "=== failed steps: $FAILED"
exit "$FAILED"
