# Sourced by scripts/compare_official.sh and scripts/compare_official_legrad.sh: sets OFFICIAL_VENV (default
# .official-venv; created when missing, never added to pyproject) and PYTHON (our venv's interpreter, default
# .venv/bin/python, else python3).
# The official packages need open_clip_torch<=2.23.0, regionembed needs open_clip 3.x: a separate venv.
# legrad imports einops, opencv (cv2), matplotlib and timm without declaring them all.
OFFICIAL_VENV="${OFFICIAL_VENV:-.official-venv}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ ! -x "$OFFICIAL_VENV/bin/python" ]]; then
    echo "creating $OFFICIAL_VENV" >&2
    python3 -m venv "$OFFICIAL_VENV"
    "$OFFICIAL_VENV/bin/pip" install --upgrade pip
    "$OFFICIAL_VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 'open_clip_torch==2.23.0' \
        legrad-torch==1.1 maskinversion-torch==1.1 safetensors einops opencv-python matplotlib timm
fi
"$OFFICIAL_VENV/bin/python" -c "import cv2, einops, matplotlib, timm, safetensors, legrad, maskinversion" || {
    echo "$OFFICIAL_VENV lacks an import of legrad/maskinversion; installing the usual suspects" >&2
    "$OFFICIAL_VENV/bin/pip" install maskinversion-torch==1.1 safetensors einops opencv-python matplotlib timm
}
