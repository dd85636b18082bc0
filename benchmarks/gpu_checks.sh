#!/usr/bin/env bash
# Run THERE, on a lent GPU machine through the device tool, from the repository root, after
# benchmarks/gpu_kit.sh packed .gpu/ here (docs/gpu-checks.md has the calls):
#   gpu_checks.sh engine                  carry .gpu/site.tar.xz: the speed table on the GPU (ct512, full
#                                         resolution and fast mode) and training throughput with AMP
#   gpu_checks.sh brats EPOCHS [ARCH...]  carry .gpu/brats.tar.xz, on the same warm machine: the brain-
#                                         tumour configuration (UNet by default) cross-validated on 3 folds
#                                         on the GPU, and the speed table on the real BraTS MRI
# What it writes under $OUT comes back (a few files, no weights).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:=gpu-results}" "${DEVICE:=cuda}" "${PYTHON:=python3}"
mkdir -p "$OUT"
if [ -f .gpu/site.tar.xz ] && [ ! -d .gpu/site ]; then
  mkdir -p .gpu/site && tar -xJf .gpu/site.tar.xz -C .gpu/site
fi
[ -d .gpu/site ] || { echo "no .gpu/site here: carry .gpu/site.tar.xz (a fresh machine has none)" >&2; exit 2; }
export PYTHONPATH="$PWD/.gpu/site:$PWD/AIReconstruct${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/machine.txt"

case "${1:-}" in
  engine)
    for options in "" "--fast"; do
      echo "## ct512 $options" >>"$OUT/pipeline.md"
      "$PYTHON" benchmarks/pipeline_benchmark.py --case ct512 --device "$DEVICE" --engine-only $options | tee -a "$OUT/pipeline.md"
    done
    "$PYTHON" -m AIReconstructLib phantoms "$work/phantoms" --count 8 --spacing 3 3 3
    "$PYTHON" -m AIReconstructLib train "$work/phantoms" -o "$work/model" --name gpu-throughput --epochs 2 \
      --iterations 100 --validate-every 2 --device "$DEVICE" 2>"$OUT/phantom-training.log"
    cp "$work/model/training_log.csv" "$OUT/phantom-training-log.csv"
    ;;
  brats)
    epochs=${2:?"brats EPOCHS [ARCHITECTURE...]"}
    shift 2
    [ -d .gpu/Dataset001_BrainTumourFLAIR ] || tar -xJf .gpu/brats.tar.xz -C .gpu
    # the speed table on the real MRI needs the data where the benchmark looks for it, beside the tree
    if mkdir -p ../shared/data && ln -sfn "$PWD/.gpu/Dataset001_BrainTumourFLAIR" ../shared/data/; then
      "$PYTHON" benchmarks/pipeline_benchmark.py --case mri240 --model brain-tumour-flair --device "$DEVICE" \
        --engine-only | tee "$OUT/pipeline-mri240.md"
    else
      echo "../shared/data cannot be made here: the mri240 table is left out" | tee "$OUT/pipeline-mri240.md"
    fi
    "$PYTHON" -m AIReconstructLib benchmark .gpu/Dataset001_BrainTumourFLAIR -o "$work/cv" \
      --architectures "${@:-UNet}" --no-adversarial --folds 3 --epochs "$epochs" --iterations 50 --batch-size 2 \
      --seed 0 --device "$DEVICE" --train-arguments --spacing 2 2 2 --patch-size 96 96 64 --mirror-axes 0 1 2 \
      --labels Resources/Labels/brain-tumour.json 2>"$OUT/cross-validation.log" | tee "$OUT/cross-validation.md"
    cp "$work/cv/table.csv" "$work/cv/cases.csv" "$work/cv/dice.png" "$OUT/"
    ;;
  *)
    echo "usage: $0 engine | brats EPOCHS [ARCHITECTURE...]" >&2
    exit 2
    ;;
esac
