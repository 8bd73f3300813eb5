#!/usr/bin/env bash
# Compare regionembed's LeGrad on SigLIP's attention-pool head with the official legrad-torch 1.1 on identical random
# ViT-B-16-SigLIP weights, images and targets (see the docstring of scripts/compare_official_legrad.py).
#
# Usage: scripts/compare_official_legrad.sh [WORKDIR]   (default: outputs/compare_official_legrad)
# Environment: PYTHON (our venv's interpreter, default .venv/bin/python, else python3),
#              OFFICIAL_VENV (default .official-venv; created when missing, never added to pyproject).
set -euo pipefail

cd "$(dirname "$0")/.."
WORKDIR="${1:-outputs/compare_official_legrad}"
OFFICIAL_VENV="${OFFICIAL_VENV:-.official-venv}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# legrad-torch 1.1 needs open_clip_torch<=2.23.0, regionembed open_clip 3.x: a separate venv (the same one
# scripts/compare_official.sh builds). legrad imports einops, cv2, matplotlib and timm without declaring them all.
if [[ ! -x "$OFFICIAL_VENV/bin/python" ]]; then
    echo "creating $OFFICIAL_VENV" >&2
    python3 -m venv "$OFFICIAL_VENV"
    "$OFFICIAL_VENV/bin/pip" install --upgrade pip
    "$OFFICIAL_VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 'open_clip_torch==2.23.0' \
        legrad-torch==1.1 safetensors einops opencv-python matplotlib timm
fi
"$OFFICIAL_VENV/bin/python" -c "import cv2, einops, matplotlib, timm, safetensors, legrad" || {
    echo "$OFFICIAL_VENV lacks an import of legrad; installing the usual suspects" >&2
    "$OFFICIAL_VENV/bin/pip" install safetensors einops opencv-python matplotlib timm
}

"$PYTHON" scripts/compare_official_legrad.py prepare --workdir "$WORKDIR"
for DTYPE in float32 float64; do
    "$OFFICIAL_VENV/bin/python" scripts/compare_official_legrad.py official --workdir "$WORKDIR" --dtype "$DTYPE"
    "$PYTHON" scripts/compare_official_legrad.py ours --workdir "$WORKDIR" --dtype "$DTYPE"
done
"$PYTHON" scripts/compare_official_legrad.py compare --workdir "$WORKDIR"
