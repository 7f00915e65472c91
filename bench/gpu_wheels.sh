#!/usr/bin/env bash
# Run HERE (not on the GPU machine) once per session before bench/gpu.sh: downloads the wheels the
# GPU image lacks (Python 3.12, x86_64) into .whl/, which the device call carries (`carry: [".whl"]`).
# The image already has torch, transformers, tokenizers, pyarrow, fsspec, pillow, scipy,
# scikit-image, timm, safetensors, huggingface-hub, regex, requests (see the device README).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth imagehash PyWavelets importlib_metadata zipp; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$spec"
done
du -sh .whl
