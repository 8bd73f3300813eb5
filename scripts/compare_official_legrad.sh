#!/usr/bin/env bash
# Compare regionembed's LeGrad on an attention-pool head (SigLIP or CoCa) with the official legrad-torch 1.1 on
# identical random weights, images and targets (see the docstring of scripts/compare_official_legrad.py).
#
# Usage: scripts/compare_official_legrad.sh [WORKDIR [MODEL]]
#        MODEL: ViT-B-16-SigLIP (default) or coca_ViT-B-32; WORKDIR default: outputs/compare_official_legrad/MODEL
# Environment: PYTHON (our venv's interpreter, default .venv/bin/python, else python3),
#              OFFICIAL_VENV (default .official-venv; created when missing, never added to pyproject).
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL="${2:-ViT-B-16-SigLIP}"
WORKDIR="${1:-outputs/compare_official_legrad/$MODEL}"
source scripts/official_venv.sh

"$PYTHON" scripts/compare_official_legrad.py prepare --workdir "$WORKDIR" --model "$MODEL"
for DTYPE in float32 float64; do
    "$OFFICIAL_VENV/bin/python" scripts/compare_official_legrad.py official --workdir "$WORKDIR" --model "$MODEL" --dtype "$DTYPE"
    "$PYTHON" scripts/compare_official_legrad.py ours --workdir "$WORKDIR" --model "$MODEL" --dtype "$DTYPE"
done
"$PYTHON" scripts/compare_official_legrad.py compare --workdir "$WORKDIR"
