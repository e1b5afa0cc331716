#!/usr/bin/env bash
# Build the virtual environment in which bench/bench_search.py runs the authors'
# released search (github.com/YiyangZhou/CSR, inference_csr/sample.py) under the
# transformers it was written for (4.46), with the same torch as the project.
#
#   bash bench/make_release_venv.sh [VENV_DIR]     # default: bench/out/release-venv
#
# The bench looks for the venv there, or where CSR_RELEASE_VENV points.
# torch 2.14.1 / torchvision 0.29.1 come from this machine's wheel store; the
# rest from the package mirror. About 6 GB (torch is a CUDA build).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/out/release-venv}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# The release imports accelerate (sample.py) and tqdm, shortuuid (utils.py);
# pins of the release's time (transformers 4.46.3: November 2024).
"$venv/bin/pip" install --quiet \
    torch==2.14.1 torchvision==0.29.1 \
    transformers==4.46.3 tokenizers==0.20.3 accelerate==1.1.1 \
    safetensors pillow numpy sentencepiece protobuf tqdm shortuuid
"$venv/bin/python" -c "import torch, transformers; print('release venv:', '$venv', 'torch', torch.__version__, 'transformers', transformers.__version__)"
