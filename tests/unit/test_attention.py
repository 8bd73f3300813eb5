import pytest
import torch

from regionembed.backbones import AttentionRecorder, UnsupportedModelError


@pytest.mark.parametrize("name", ["tiny_backbone", "tiny_ls_backbone", "timm_backbone"])
def test_outputs_identical_and_nothing_left_behind(request, name):
    b = request.getfixturevalue(name)
    s = b.preprocess.size
    x = torch.randn(2, 3, s, s)
    keys = list(b.state_dict().keys())
    params = {k: p for k, p in b.named_parameters()}
    with torch.no_grad():
        ref = b.encode_image(x)
    with AttentionRecorder(b.blocks, layers=[0, -1]) as rec:
        with torch.no_grad():
            out = b.encode_image(x)
        assert set(rec.records) == {0, len(b.blocks) - 1}
        assert {k: p for k, p in b.named_parameters()} == params  # the same Parameter objects
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert list(b.state_dict().keys()) == keys
    for blk in b.blocks:
        assert "forward" not in blk.attn.__dict__
        assert not blk._forward_hooks and not blk._forward_pre_hooks
    record = rec[-1]
    t = b.num_prefix_tokens + (s // b.patch_size) ** 2
    assert record.probs.shape == (2, record.probs.shape[1], t, t)
    torch.testing.assert_close(record.probs.sum(-1), torch.ones_like(record.probs.sum(-1)))


def test_probabilities_have_gradients_with_frozen_model(tiny_backbone):
    b = tiny_backbone
    x = torch.randn(1, 3, 32, 32)
    with AttentionRecorder(b.blocks, layers=[-1]) as rec:
        emb = b.encode_image(x)
    (g,) = torch.autograd.grad(emb.sum(), rec[-1].probs)
    assert g.abs().sum() > 0
    assert not any(p.requires_grad for p in b.parameters())


def test_gradients_flow_to_parameters_when_trainable():
    from regionembed.backbones import OpenCLIPBackbone

    b = OpenCLIPBackbone("re-tiny-vit")
    with AttentionRecorder(b.blocks, layers=[-1]) as rec:
        emb = b.encode_image(torch.randn(1, 3, 32, 32))
    (g,) = torch.autograd.grad(emb.sum(), rec[-1].probs, create_graph=True)
    g.sum().backward()
    assert b.blocks[-1].mlp.c_fc.weight.grad is not None


def test_unsupported_library_version_is_loud(tiny_backbone, monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "__version__", "2.23.0")
    with pytest.raises(UnsupportedModelError, match=r"open_clip 2\.23\.0 is not supported"):
        AttentionRecorder(tiny_backbone.blocks, layers=[-1]).__enter__()
    for blk in tiny_backbone.blocks:  # a failed attach leaves nothing behind
        assert "forward" not in blk.attn.__dict__


def test_unsupported_block_and_bad_layer(tiny_backbone):
    with pytest.raises(UnsupportedModelError, match="not supported"), AttentionRecorder([torch.nn.Linear(2, 2)], [0]):
        pass
    with pytest.raises(ValueError, match="out of range"):
        AttentionRecorder(tiny_backbone.blocks, layers=[5])


def test_nested_recorders_refused(tiny_backbone):
    outer = AttentionRecorder(tiny_backbone.blocks, layers=[-1])
    inner = AttentionRecorder(tiny_backbone.blocks, layers=[-1])
    with outer, pytest.raises(RuntimeError, match="already instrumented"), inner:
        pass
    assert "forward" not in tiny_backbone.blocks[-1].attn.__dict__
