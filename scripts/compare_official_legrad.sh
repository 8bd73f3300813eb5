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
source scripts/official_venv.sh

"$PYTHON" scripts/compare_official_legrad.py prepare --workdir "$WORKDIR"
for DTYPE in float32 float64; do
    "$OFFICIAL_VENV/bin/python" scripts/compare_official_legrad.py official --workdir "$WORKDIR" --dtype "$DTYPE"
    "$PYTHON" scripts/compare_official_legrad.py ours --workdir "$WORKDIR" --dtype "$DTYPE"
done
"$PYTHON" scripts/compare_official_legrad.py compare --workdir "$WORKDIR"
