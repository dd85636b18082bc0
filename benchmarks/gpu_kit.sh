#!/usr/bin/env bash
# Run HERE, before asking for a GPU machine: packs into .gpu/ (git-ignored) what a lent GPU machine
# lacks for the engine (it has Python 3.12 and PyTorch with CUDA, and no network): the engine's core
# libraries as Python 3.12 wheels, unpacked and xz-compressed (SimpleITK's 53 MB wheel packs to
# 28 MB) so that they travel with the tree within the device tool's 64 MiB, and, apart, the BraTS
# data set for a second call. How to use it: docs/gpu-checks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels monai==1.6.1 SimpleITK==2.5.7 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 pynrrd==1.1.3
for wheel in .gpu/wheels/*.whl; do
  python3 -m zipfile -e "$wheel" .gpu/site
done
tar -cJf .gpu/site.tar.xz -C .gpu/site .
rm -rf .gpu/wheels .gpu/site
if [ -d ../shared/data/Dataset001_BrainTumourFLAIR ]; then
  tar -cJf .gpu/brats.tar.xz -C ../shared/data Dataset001_BrainTumourFLAIR
fi
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for part in .gpu/*.tar.xz; do
  echo "$part: $(( $(stat -c %s "$part") / 1048576 )) MiB; with the tracked tree $(( (tree_bytes + $(stat -c %s "$part")) / 1048576 )) MiB of 64"
done
