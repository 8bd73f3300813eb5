"""The one inference-mode guard: methods that need autograd (gradient explainers, MaskInversion's inner loop).

Lightning evaluates under ``torch.inference_mode()`` by default, where no tensor can ever take part in autograd,
not even inside ``torch.enable_grad()``. Everything that differentiates at test/predict time calls
:func:`require_grad_mode` first, so the user gets one clear message naming the setting instead of a deep autograd
error.
"""

from __future__ import annotations

import torch

__all__ = ["require_grad_mode"]


def require_grad_mode(what: str = "this method") -> None:
    """Raise ``RuntimeError`` naming ``trainer.inference_mode: false`` when called under ``torch.inference_mode``.

    Args:
        what: who needs autograd, for the message (e.g. ``"MaskInversion"``, ``"Grad-CAM"``).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd, which torch.inference_mode() forbids: with Lightning set "
            "`trainer.inference_mode: false` (Trainer(inference_mode=False)); the shipped configs do"
        )
