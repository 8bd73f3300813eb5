#!/usr/bin/env bash
# Compare regionembed's MaskInversion with the official maskinversion-torch 1.1 / legrad-torch 1.1 on identical
# random ViT-B-16 weights, image and masks (see the docstring of scripts/compare_official.py).
#
# Usage: scripts/compare_official.sh [WORKDIR]   (default: outputs/compare_official)
# Environment: PYTHON (our venv's interpreter, default .venv/bin/python, else python3),
#              OFFICIAL_VENV (default .official-venv; created when missing, never added to pyproject).
set -euo pipefail

cd "$(dirname "$0")/.."
WORKDIR="${1:-outputs/compare_official}"
source scripts/official_venv.sh

"$PYTHON" scripts/compare_official.py prepare --workdir "$WORKDIR"
# float32 is the comparison proper; float64 separates algorithmic differences from float32 rounding
for DTYPE in float32 float64; do
    "$OFFICIAL_VENV/bin/python" scripts/compare_official.py official --workdir "$WORKDIR" --dtype "$DTYPE"
    "$PYTHON" scripts/compare_official.py ours --workdir "$WORKDIR" --dtype "$DTYPE"
done
"$PYTHON" scripts/compare_official.py compare --workdir "$WORKDIR"
