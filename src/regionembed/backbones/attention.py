"""The attention recorder: the one place in regionembed that reaches into attention internals.

Fused attention kernels (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``) never materialise the
post-softmax probabilities on the autograd graph, so no gradient with respect to them exists. Inside an
:class:`AttentionRecorder` context the attention modules of the chosen blocks run an explicit, numerically equivalent
forward (``softmax(q k^T / sqrt(d)) v``) that keeps the probabilities, the per-head values and the block's
intermediate activations. The same ``Parameter`` objects are used (no copies, ``state_dict`` keys unchanged), and
everything is undone on exit.

Supported: open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention``, self-attention), open_clip's
``AttentionalPooler`` (CoCa: learned queries cross-attending over the tokens, ``[B, H, Q, T]`` probabilities), timm
``vision_transformer.Block`` with ``timm.layers.Attention``, timm ``EvaBlock`` (and ``EvaBlockPostNorm``, EVA02-E)
with ``EvaAttention`` or ``AttentionRope`` (EVA01, EVA02, PE-Core: rotary embeddings, fused or separate q/k/v), and
``transformers`` ``CLIPAttention`` / ``SiglipAttention`` (eager or SDPA kernels) in the encoder layers of
:class:`~regionembed.backbones.hf.HFBackbone`.
:class:`MHAPoolRecorder` records the probe attention of an ``nn.MultiheadAttention`` pooling head (``transformers``'
``SiglipMultiheadAttentionPoolingHead``); :func:`attention_pool_forward` runs timm's ``AttentionPoolLatent``
(SigLIP's and PE's ``map`` head) with its probabilities kept. Anything else raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionRecord",
    "AttentionRecorder",
    "MHAPoolRecorder",
    "UnsupportedModelError",
    "attention_pool_forward",
    "check_library_versions",
]

# Versions whose attention internals this module was written and tested against.
_SUPPORTED = {"open_clip": ((3, 0), (4, 0)), "timm": ((1, 0), (1, 1)), "transformers": ((5, 24), (6, 0))}


class UnsupportedModelError(RuntimeError):
    """Raised when a model or library version is outside what the recorder knows how to instrument."""


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_library_versions(library: str) -> None:
    """Fail loudly if ``library`` ("open_clip" or "timm") has a version whose internals were not verified."""
    if library == "open_clip":
        import open_clip

        version = open_clip.__version__
    elif library == "timm":
        import timm

        version = timm.__version__
    elif library == "transformers":
        import transformers

        version = transformers.__version__
    else:
        raise UnsupportedModelError(f"unknown library {library!r}")
    low, high = _SUPPORTED[library]
    if not low <= _version_tuple(version) < high:
        raise UnsupportedModelError(
            f"{library} {version} is not supported by regionembed's attention recorder "
            f"(verified: >={low[0]}.{low[1]},<{high[0]}.{high[1]}); pin a supported version"
        )


@dataclass
class AttentionRecord:
    """What one block left behind during a recorded forward (all batch-first).

    Attributes:
        probs: ``[B, H, T, T]`` post-softmax attention probabilities, on the autograd graph (``[B, H, Q, T]`` for
            an attention pool's ``Q`` queries).
        v: ``[B, H, T, dh]`` per-head values.
        x_in: ``[B, T, C]`` block input.
        attn_out: ``[B, T, C]`` attention branch output (after the output projection, before layer scale).
        out: ``[B, T, C]`` block output.
    """

    probs: torch.Tensor | None = None
    v: torch.Tensor | None = None
    x_in: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    out: torch.Tensor | None = None


@dataclass
class _Patch:
    attn: nn.Module
    handles: list = field(default_factory=list)


def _explicit_attention(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    dropout_p: float,
    record: AttentionRecord,
    leaf_probs: bool,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with the probabilities kept. q, k, v: ``[B, H, T, dh]``."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    if leaf_probs and torch.is_grad_enabled() and not probs.requires_grad:
        # Nothing upstream requires grad (frozen model, plain image): make the probabilities a leaf so that
        # gradients with respect to them still exist.
        probs.requires_grad_(True)
    record.probs = probs
    record.v = v
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _mask_to_bias(attn_mask: torch.Tensor | None, dtype: torch.dtype, batch: int, heads: int) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    if attn_mask.ndim == 3:  # [B*H, T, T] as nn.MultiheadAttention takes it
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
    return attn_mask.to(dtype)


def _mha_forward(recorder: AttentionRecorder, index: int):
    """An explicit forward for ``nn.MultiheadAttention`` used as self-attention."""

    def forward(
        self: nn.MultiheadAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if not (query is key and key is value):
            if recorder.cross_attention.get(index, False) and key is value:
                return _cross_attention(self, query, key, recorder.records[index], recorder.leaf_probs)
            raise UnsupportedModelError("the attention recorder supports self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, t, c = x.shape
        h = self.num_heads
        dh = c // h
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (y.reshape(b, t, h, dh).transpose(1, 2) for y in (q, k, v))
        bias = _mask_to_bias(attn_mask, q.dtype, b, h)
        if is_causal and bias is None:
            bias = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if key_padding_mask is not None:
            kpm = _mask_to_bias(key_padding_mask, q.dtype, b, h).view(b, 1, 1, t)
            bias = kpm if bias is None else bias + kpm
        record = recorder.records[index]
        o = _explicit_attention(
            x, q, k, v, dh**-0.5, bias, self.dropout if self.training else 0.0, record, recorder.leaf_probs
        )
        out = F.linear(o.transpose(1, 2).reshape(b, t, c), self.out_proj.weight, self.out_proj.bias)
        record.attn_out = out
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = record.probs.mean(dim=1) if average_attn_weights else record.probs
        return out, weights

    return forward


def _cross_attention(
    mha: nn.MultiheadAttention, query: torch.Tensor, context: torch.Tensor, record: AttentionRecord, leaf_probs: bool
) -> tuple[torch.Tensor, None]:
    """``nn.MultiheadAttention(query, context, context)`` (no masks, batch-first) with the probabilities kept.

    Args:
        query: ``[B, Q, E]`` queries; context: ``[B, T, kdim]`` keys and values (``kdim`` may differ from ``E``).
    """
    b, nq, e = query.shape
    t = context.shape[1]
    h = mha.num_heads
    dh = e // h
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).reshape(b, nq, h, dh).transpose(1, 2)  # [B, H, Q, dh]
    k = F.linear(context, w_k, b_k).reshape(b, t, h, dh).transpose(1, 2)  # [B, H, T, dh]
    v = F.linear(context, w_v, b_v).reshape(b, t, h, dh).transpose(1, 2)
    o = _explicit_attention(
        query, q, k, v, dh**-0.5, None, mha.dropout if mha.training else 0.0, record, leaf_probs
    )  # [B, H, Q, dh]
    out = F.linear(o.transpose(1, 2).reshape(b, nq, e), mha.out_proj.weight, mha.out_proj.bias)
    record.attn_out = out
    return out, None


def _timm_forward(recorder: AttentionRecorder, index: int):
    """An explicit forward for ``timm.layers.Attention`` (the non-fused path of timm, with probabilities kept)."""
    from timm.layers.attention import resolve_self_attn_mask

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, **kwargs):
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return _timm_attention_tail(
            self, x, q, k, v, gate, resolve_self_attn_mask(n, q, attn_mask, is_causal), recorder, index
        )

    return forward


def _timm_attention_tail(attn, x, q, k, v, gate, bias, recorder: AttentionRecorder, index: int) -> torch.Tensor:
    """What timm's ``Attention`` and eva's ``EvaAttention``/``AttentionRope`` do after q/k/v: the explicit attention
    (probabilities recorded), the inner norm, the output gate and the projection; ``[B, N, C]``."""
    b, n, _ = x.shape
    record = recorder.records[index]
    dropout = attn.attn_drop.p if attn.training else 0.0
    o = _explicit_attention(x, q, k, v, attn.scale, bias, dropout, record, recorder.leaf_probs)
    o = attn.norm(o.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        o = o * gate
    out = attn.proj_drop(attn.proj(o))
    record.attn_out = out
    return out


def _attention_and_forward(block: nn.Module, recorder: AttentionRecorder, index: int):
    """Find the attention module of ``block`` and the explicit forward to put in its place."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        check_library_versions("open_clip")
        from open_clip.transformer import AttentionalPooler

        if isinstance(block, AttentionalPooler):  # CoCa: learned queries attend over the tokens
            if attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first:
                raise UnsupportedModelError("this AttentionalPooler's attention is not supported by the recorder")
            recorder.cross_attention[index] = True
            return attn, _mha_forward(recorder, index)
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError("nn.MultiheadAttention with separate q/k/v weights or bias_k is not supported")
        return attn, _mha_forward(recorder, index)
    try:
        from timm.layers import Attention as TimmAttention
    except ImportError:  # pragma: no cover - timm is a dependency
        TimmAttention = ()
    if isinstance(attn, TimmAttention):
        check_library_versions("timm")
        import timm.layers.attention as timm_attention

        if not hasattr(timm_attention, "resolve_self_attn_mask"):
            raise UnsupportedModelError("this timm 1.0.x predates the attention internals the recorder was written for")
        return attn, _timm_forward(recorder, index)
    eva = _eva_attention_and_forward(block, recorder, index)  # timm eva.py blocks (EVA02, PE-Core)
    if eva is not None:
        return eva
    hf_forward = _hf_attention_forward_for(attn, recorder, index)
    if hf_forward is not None:
        return attn, hf_forward
    raise UnsupportedModelError(
        f"block {type(block).__name__} with attention {type(attn).__name__} is not supported by the attention "
        "recorder (supported: open_clip ResidualAttentionBlock and AttentionalPooler, timm vision_transformer.Block, "
        "timm EvaBlock/EvaBlockPostNorm with EvaAttention or AttentionRope, transformers CLIP/SigLIP encoder layers)"
    )


# --------------------------------------------------------------------------- Hugging Face transformers (CLIP, SigLIP)
def _hf_attention_classes() -> tuple[type, ...]:
    """``transformers``' CLIP and SigLIP attention classes, or ``()`` when ``transformers`` was never imported (then
    no module can be one of them, and importing it here would cost seconds for nothing)."""
    import sys

    if "transformers" not in sys.modules:
        return ()
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.siglip.modeling_siglip import SiglipAttention

    return CLIPAttention, SiglipAttention


def _hf_attention_forward_for(attn: nn.Module | None, recorder: AttentionRecorder, index: int):
    """The explicit forward for a ``transformers`` CLIP/SigLIP attention, ``None`` for any other module."""
    classes = _hf_attention_classes()
    if not classes or not isinstance(attn, classes):
        return None
    check_library_versions("transformers")
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale") if not hasattr(attn, a)]
    if missing:
        raise UnsupportedModelError(
            f"{type(attn).__name__} of this transformers version lacks {', '.join(missing)}: pin a supported version"
        )
    return _hf_forward(recorder, index)


def _hf_forward(recorder: AttentionRecorder, index: int):
    """An explicit forward for ``CLIPAttention`` / ``SiglipAttention`` (what their eager kernel computes, with the
    probabilities kept): ``(hidden_states, attention_mask=None, **kwargs) -> (output, probs)``."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        bias = _mask_to_bias(attention_mask, q.dtype, b, q.shape[1])  # transformers passes an additive mask
        if getattr(self, "is_causal", False):
            causal = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
            bias = causal if bias is None else bias + causal
        record = recorder.records[index]
        dropout = float(self.dropout) if self.training else 0.0
        o = _explicit_attention(hidden_states, q, k, v, self.scale, bias, dropout, record, recorder.leaf_probs)
        out = self.out_proj(o.transpose(1, 2).reshape(b, t, -1))
        record.attn_out = out
        return out, record.probs

    return forward


# ---------------------------------------------------------------- timm eva.py attention and attention pools
def _eva_forward(recorder: AttentionRecorder, index: int):
    """An explicit forward for timm ``EvaAttention`` / ``AttentionRope`` (EVA02, PE-Core): fused or separate q/k/v,
    EVA's zero k-bias, q/k norms, rotary embeddings on the patch tokens, grouped k/v heads, the inner scale norm and
    the output gate, as timm's own non-fused path, with the probabilities kept."""
    from timm.layers import apply_rot_embed_cat, resolve_self_attn_mask

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.qkv is not None:
            q_bias = getattr(self, "q_bias", None)  # EvaAttention keeps the biases apart (k's is a zero buffer)
            bias = torch.cat((q_bias, self.k_bias, self.v_bias)) if q_bias is not None else self.qkv.bias
            qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        bias = resolve_self_attn_mask(n, q, attn_mask, is_causal)
        return _timm_attention_tail(self, x, q, k, v, gate, bias, recorder, index)

    return forward


def _eva_attention_and_forward(block: nn.Module, recorder: AttentionRecorder, index: int):
    """``(attention module, explicit forward)`` for a timm ``EvaBlock`` or ``EvaBlockPostNorm`` (EVA02-E: the same
    attention, normed after it); ``None`` for any other block."""
    try:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
    except ImportError:  # pragma: no cover - timm is a dependency; an older timm has no eva blocks to record
        return None
    if not isinstance(block, EvaBlock | EvaBlockPostNorm) or not isinstance(block.attn, EvaAttention | AttentionRope):
        return None
    check_library_versions("timm")
    for name in ("num_heads", "head_dim", "scale", "num_prefix_tokens", "q_norm", "k_norm", "norm", "proj"):
        if not hasattr(block.attn, name):
            raise UnsupportedModelError(f"this timm's {type(block.attn).__name__} lacks {name!r}; pin timm 1.0.x")
    return block.attn, _eva_forward(recorder, index)


def attention_pool_forward(
    pool: nn.Module, x: torch.Tensor, leaf_probs: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``AttentionPoolLatent`` (SigLIP's and PE's ``map`` head) with its attention probabilities kept.

    The same computation as the pool's own forward (its non-fused path), with the same ``Parameter`` objects and
    nothing attached to the module (a plain function: there is nothing to undo).

    Args:
        pool: a timm ``AttentionPoolLatent``.
        x: ``[B, T, C]`` tokens.
        leaf_probs: when grad mode is on but nothing upstream requires grad, make the probabilities an autograd leaf.

    Returns:
        ``(pooled, probs)``: the pool's output (``[B, C']``, or ``[B, Q, C']`` for ``pool_type=''``) and the
        post-softmax probabilities ``[B, H, Q, T]`` of the latent queries over the tokens.
    """
    from timm.layers import AttentionPoolLatent

    if not isinstance(pool, AttentionPoolLatent):
        raise UnsupportedModelError(f"{type(pool).__name__} is not a timm AttentionPoolLatent")
    check_library_versions("timm")
    b, n, _ = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    q = q.transpose(1, 2)
    k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    probs = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, Q, T]
    if leaf_probs and torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_(True)
    out = (probs @ v).transpose(1, 2).reshape(b, pool.latent_len, -1)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        out = out[:, 0]
    elif pool.pool == "avg":
        out = out.mean(1)
    return out, probs


# ------------------------------------------------------------------ attention-pool heads: nn.MultiheadAttention probe
def _mha_cross_forward(pool: MHAPoolRecorder):
    """An explicit forward for ``nn.MultiheadAttention`` used as a pooling head: learned queries ``[B, Q, C]``
    attending to tokens ``[B, T, C]`` (key is value)."""

    def forward(
        self: nn.MultiheadAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if key is not value or attn_mask is not None or key_padding_mask is not None or is_causal:
            raise UnsupportedModelError("the pool recorder supports unmasked attention with key == value only")
        if not self.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        pool.record.x_in = key
        out, _ = _cross_attention(self, query, key, pool.record, pool.leaf_probs)  # as CoCa's pooler: [B, Q, C]
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            probs = pool.record.probs
            weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, weights

    return forward


class MHAPoolRecorder:
    """Record the probe attention of an ``nn.MultiheadAttention`` pooling head, with gradients.

    Example::

        with MHAPoolRecorder(siglip_vision.head.attention) as rec:
            embedding = siglip_vision.head(tokens)
        probs = rec.record.probs  # [B, H, Q, T]: the Q learned queries' attention over the T tokens

    The same guarantees as :class:`AttentionRecorder`: the same ``Parameter`` objects, ``state_dict`` keys
    unchanged, outputs equal to the fused kernel's, nothing left behind on exit, nesting refused.

    Args:
        attn: the pooling head's attention (``batch_first`` or not, no ``bias_k``).
        leaf_probs: as in :class:`AttentionRecorder`.
    """

    def __init__(self, attn: nn.Module, leaf_probs: bool = True) -> None:
        if not isinstance(attn, nn.MultiheadAttention):
            raise UnsupportedModelError(f"MHAPoolRecorder needs an nn.MultiheadAttention, got {type(attn).__name__}")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError("nn.MultiheadAttention with bias_k or add_zero_attn is not supported")
        self.attn = attn
        self.leaf_probs = leaf_probs
        self.record = AttentionRecord()

    def __enter__(self) -> MHAPoolRecorder:
        if "forward" in self.attn.__dict__:
            raise RuntimeError("this pooling attention is already instrumented (nested MHAPoolRecorder?)")
        self.attn.forward = types.MethodType(_mha_cross_forward(self), self.attn)
        return self

    def __exit__(self, *exc) -> None:
        self.attn.__dict__.pop("forward", None)


class AttentionRecorder:
    """Record post-softmax attention probabilities (with gradients) and block activations.

    Example::

        with AttentionRecorder(backbone.blocks, layers=[-1]) as rec:
            emb = backbone.encode_image(image)
        probs = rec.records[-1].probs  # [B, H, T, T], differentiable

    Args:
        blocks: the transformer blocks of the vision tower (``backbone.blocks``), or attention-pool modules.
        layers: indices into ``blocks`` to record (negative indices allowed).
        leaf_probs: when grad mode is on but nothing upstream requires grad, make the probabilities an autograd
            leaf so that gradients with respect to them can still be taken (the model stays frozen).
    """

    def __init__(self, blocks: Sequence[nn.Module], layers: Sequence[int], leaf_probs: bool = True) -> None:
        self.blocks = list(blocks)
        n = len(self.blocks)
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"layer index {layer} is out of range for a model with {n} blocks")
        self.layers = sorted({layer % n for layer in layers})
        self.leaf_probs = leaf_probs
        self.records: dict[int, AttentionRecord] = {}
        #: per recorded index: whether the module is an attention pool (cross-attention from learned queries)
        self.cross_attention: dict[int, bool] = {}
        self._patches: list[_Patch] = []

    def __getitem__(self, layer: int) -> AttentionRecord:
        return self.records[layer % len(self.blocks)]

    def __enter__(self) -> AttentionRecorder:
        try:
            for i in self.layers:
                self._attach(i)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._detach()

    def _attach(self, index: int) -> None:
        block = self.blocks[index]
        attn, forward = _attention_and_forward(block, self, index)
        if "forward" in attn.__dict__:
            raise RuntimeError(f"block {index} is already instrumented (nested AttentionRecorder?)")
        record = AttentionRecord()
        self.records[index] = record
        patch = _Patch(attn)
        self._patches.append(patch)
        attn.forward = types.MethodType(forward, attn)

        def pre_hook(module, args, kwargs):
            record.x_in = args[0] if args else kwargs.get("x", kwargs.get("q_x"))

        def post_hook(module, args, kwargs, output):
            record.out = output

        patch.handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        patch.handles.append(block.register_forward_hook(post_hook, with_kwargs=True))

    def _detach(self) -> None:
        for patch in self._patches:
            patch.attn.__dict__.pop("forward", None)
            for handle in patch.handles:
                handle.remove()
        self._patches.clear()
