"""The one inference-mode guard (``regionembed.grad_mode``), used by every method that needs autograd."""

import pytest
import torch

from regionembed.grad_mode import require_grad_mode


def test_guard_refuses_inference_mode_and_names_the_setting():
    require_grad_mode("MaskInversion")  # grad mode: nothing to say
    with torch.no_grad():
        require_grad_mode("MaskInversion")  # no_grad is fine: the methods re-enable grad themselves
    with torch.inference_mode(), pytest.raises(RuntimeError) as err:
        require_grad_mode("MaskInversion")
    message = str(err.value)
    assert message.startswith("MaskInversion needs autograd")
    assert "trainer.inference_mode: false" in message and "Trainer(inference_mode=False)" in message
