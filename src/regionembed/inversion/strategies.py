"""How the MaskInversion solver computes LeGrad maps of the localized embedding tokens at every step.

For a fixed image and a frozen model, LeGrad's layer score ``s = <e, f>`` is *linear* in the (normalised) token
``e``, so the gradient of ``s`` with respect to a block's attention probabilities is ``G(e) = J^T e`` for a constant
Jacobian ``J`` of that block's tail. These strategies compute the official LeGrad only (``LeGrad(pooling="mean")``,
:func:`~regionembed.inversion.solver.uses_legrad_strategies`); every other explainer runs :class:`ExplainerStrategy`,
the explainer recomputed with ``create_graph`` at every step. Three strategies compute ``G``:

``naive``
    The reference: the official algorithm. The image is repeated once per mask, and each step takes
    ``autograd.grad(s, probs, create_graph=True)`` and back-propagates the loss through that graph
    (a second-order backward through the block, N image copies).
``per_step``
    One forward of one image, no autograd through the model at all. Each step evaluates ``G(e)`` with explicit
    formulas for the block tail (``G_h = dO_h V_h^T`` with ``dO`` the vector-Jacobian product of the token-wise MLP,
    layer norm, layer scales and output projection, all pre-evaluated at the image's activations); the loss gradient
    is the ordinary first-order backward of those formulas, i.e. the transposed Jacobian product.
``precomputed``
    As ``per_step`` but the map ``e -> dO`` (``[D, T, C]``, factored through the per-head attention outputs) is
    evaluated once on the D basis vectors; each step is then one matrix product ``e @ P`` plus ``dO V^T``. Amortises
    over many masks and iterations at the price of ``D * T * C`` floats per layer.

All three agree numerically (see ``tests/unit/test_strategies.py``). A fourth covers attention-pool heads
(:class:`~regionembed.backbones.base.AttentionPoolHead` with a pool: SigLIP, SigLIP2, PE-Core, CoCa, HF SigLIP), where
LeGrad differentiates the pool's attention rather than a block's and the formulas above do not apply:

``attention_pool``
    The Jacobian of LeGrad's pooled score (normalised, or raw on CoCa as the official recipe) with respect to the
    pool's attention is tabulated once per layer, on the pool queries the score reads only, and each step is one
    product (``tests/unit/test_open_clip_timm.py`` and ``tests/unit/test_coca.py`` check it against ``naive``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.attention import AttentionRecorder, UnsupportedModelError
from ..backbones.base import Backbone, TokenGridBackbone, require, uses_attention_pool
from ..explainers.base import Explainer, min_max, relevance_to_map
from ..explainers.legrad import LeGrad, attention_pool_features, attention_pool_map

__all__ = [
    "STRATEGIES",
    "CostEstimate",
    "MapStrategy",
    "attention_pool_shape",
    "attention_pool_table_shape",
    "decomposition_issue",
    "estimate_costs",
    "legrad_pool_queries",
]

#: what the LeGrad strategies (all but ``explainer``) need instead, for the error message
LEGRAD_ALTERNATIVE = "a CAM explainer, MaskInversion(explainer=GradCAM(normalize=False))"


class MapStrategy(abc.ABC):
    """Computes min-max normalised maps ``[N, H, W]`` of tokens ``e`` ``[N, D]`` for one image, differentiably."""

    name: str

    def __init__(self, backbone: Backbone, image: torch.Tensor, layers: Sequence[int], num_masks: int, eps: float):
        self.backbone = backbone
        self.layers = list(layers)
        self.num_masks = num_masks
        self.eps = eps
        self.grid = backbone.grid_size(tuple(image.shape[-2:]))
        #: ``[1, D]`` image embedding (un-normalised), the token's initialisation
        self.image_embedding: torch.Tensor

    @abc.abstractmethod
    def maps(self, e: torch.Tensor) -> torch.Tensor:
        """``e`` ``[N, D]`` (normalised tokens) -> ``[N, H, W]`` maps in [0, 1], differentiable w.r.t. ``e``."""

    def gradient(self, loss: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Gradient of ``loss`` with respect to the optimised ``tokens`` ``[N, D]`` (first order, tokens only)."""
        (grad,) = torch.autograd.grad(loss, tokens)
        return grad

    def close(self) -> None:  # noqa: B027 - optional hook, most strategies change nothing
        """Release what the strategy holds and undo any change it made to the backbone."""


class NaiveStrategy(MapStrategy):
    """The official algorithm, step for step: N image copies, LeGrad with ``create_graph=True``, and
    ``loss.backward()`` with the explained blocks' parameters requiring grad (as the official ``LeWrapper`` sets
    them), so each step also pays for weight gradients nobody uses. Flags and ``.grad`` are restored afterwards.
    """

    name = "naive"
    #: the official wrapper leaves the explained blocks trainable; ``naive_lean`` differentiates the tokens only
    weight_grads = True

    def __init__(self, backbone, image, layers, num_masks, eps):
        require(backbone, TokenGridBackbone, "MaskInversion with LeGrad maps", alternative=LEGRAD_ALTERNATIVE)
        super().__init__(backbone, image, layers, num_masks, eps)
        self.layers = backbone.layer_indices(layers)
        self.images = image.expand(num_masks, -1, -1, -1)
        self.legrad = LeGrad(self.layers, eps=eps)
        self._saved = {p: (p.requires_grad, p.grad) for p in backbone.parameters()}
        trainable = {id(p) for blk in list(backbone.blocks)[self.layers[0] :] for p in blk.parameters()}
        try:
            for p in backbone.parameters():
                p.requires_grad_(self.weight_grads and id(p) in trainable)
                p.grad = None
            with torch.enable_grad(), AttentionRecorder(backbone.blocks, self.layers) as rec:
                tokens = backbone.forward_blocks(backbone.embed_tokens(self.images))
                self.image_embedding = backbone.pool_tokens(tokens).detach()[:1]
        except BaseException:  # e.g. out of memory with many image copies: leave the backbone as it was
            self.close()
            raise
        self.recorder = rec

    def maps(self, e):
        return self.legrad.explain(self.backbone, self.images, e, create_graph=True, recorder=self.recorder)

    def gradient(self, loss: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if not self.weight_grads:
            return super().gradient(loss, tokens)
        for p in self.backbone.parameters():
            p.grad = None  # the official loop zeroes the model's gradients every step
        tokens.grad = None
        loss.backward(retain_graph=True)
        return tokens.grad

    def close(self) -> None:
        for p, (flag, grad) in self._saved.items():
            p.requires_grad_(flag)
            p.grad = grad
        self._saved = {}
        self.recorder = None


class NaiveLeanStrategy(NaiveStrategy):
    """The naive double backward without the official code's weight gradients (token gradients only)."""

    name = "naive_lean"
    weight_grads = False


class ExplainerStrategy(MapStrategy):
    """Any differentiable explainer, recomputed from scratch at every step (no reuse, no decomposition).

    The path of every explainer but the official LeGrad: the explainer's own settings (layers, ``eps``, pooling)
    apply; ``layers``/``eps`` of the base class are unused.
    """

    name = "explainer"

    def __init__(self, backbone, image, num_masks, explainer: Explainer):
        super().__init__(backbone, image, (), num_masks, getattr(explainer, "eps", 1e-12))
        self.explainer = explainer
        self.image = image
        with torch.no_grad():
            self.image_embedding = backbone.encode_image(image)

    def maps(self, e):
        with torch.enable_grad():
            return self.explainer(self.backbone, self.image, e, create_graph=True)


@dataclass
class _LayerTerms:
    """Constants of one block's tail, evaluated once at the image's activations (batch of one).

    With ``u = d s / d x_out[t]`` (the same for every token: mean pooling), ``h[t] = ((u * ls2) W2) * act'(a_t)``
    the MLP's hidden cotangent and ``W' = diag(ls1) W_out``, the layer-norm VJP at token t,
    ``LN_t(g) = (g - mean(g) - xhat_t mean(g * xhat_t)) / sigma_t``, lets ``fc1``, the norm's gain and ``W'`` fold
    into one matrix ``M = W1 diag(gamma) W'``: ``dO[t] = (h[t] M - (h[t].w1g) r1 - (h[t].X1[t]) R2[t]) / sigma_t
    + u W'``, one ``[N*T, 4C] x [4C, H*dh]`` product per step instead of two.
    """

    j_pool: torch.Tensor  # [D, C]  d normalize(head(mean tokens)) / d mean tokens
    ls2: torch.Tensor | None  # [C]
    w2: torch.Tensor  # [C, 4C]  fc2 weight
    act_grad: torch.Tensor  # [T, 4C]  act'(fc1(norm2(x_mid)))
    inv_sigma: torch.Tensor  # [T, 1]  1 / sigma of norm2 at x_mid
    w_prime: torch.Tensor  # [C, H*dh]  diag(ls1) W_out (row vectors: d attn_out -> dO)
    m: torch.Tensor  # [4C, H*dh]  fc1.weight diag(gamma) w_prime
    w1g: torch.Tensor  # [4C]  fc1.weight @ gamma / C
    x1: torch.Tensor  # [T, 4C]  (gamma * xhat_t) @ fc1.weight^T / C
    r1: torch.Tensor  # [H*dh]  column sums of w_prime
    r2: torch.Tensor  # [T, H*dh]  xhat @ w_prime
    v: torch.Tensor  # [H, T, dh]

    @property
    def num_tokens(self) -> int:
        return self.act_grad.shape[0]

    def d_heads(self, e: torch.Tensor) -> torch.Tensor:
        """``dO = d s / d (per-head attention outputs)`` for tokens ``e`` ``[N, D]`` -> ``[N, T, H*dh]``.

        Linear in ``e``; differentiable through :class:`_TailMap`, whose backward is the transposed map (it keeps
        nothing of size N alive between forward and backward).
        """
        return _TailMap.apply(e, self)

    def forward_map(self, e: torch.Tensor) -> torch.Tensor:
        u = (e @ self.j_pool) / self.num_tokens  # [N, C]
        c2 = u * self.ls2 if self.ls2 is not None else u
        hidden = (c2 @ self.w2).unsqueeze(1) * self.act_grad  # [N, T, 4C]
        out = hidden @ self.m  # [N, T, H*dh]
        out -= (hidden @ self.w1g).unsqueeze(-1) * self.r1
        out -= (hidden * self.x1).sum(-1, keepdim=True) * self.r2
        out *= self.inv_sigma
        out += (u @ self.w_prime).unsqueeze(1)  # residual path
        return out

    def transpose_map(self, grad: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`forward_map`: ``[N, T, H*dh] -> [N, D]``."""
        g_u = grad.sum(1) @ self.w_prime.T
        scaled = grad * self.inv_sigma
        g_hidden = scaled @ self.m.T  # [N, T, 4C]
        g_hidden -= (scaled @ self.r1).unsqueeze(-1) * self.w1g
        g_hidden -= (scaled * self.r2).sum(-1, keepdim=True) * self.x1
        g_c2 = (g_hidden * self.act_grad).sum(1) @ self.w2.T
        g_u += g_c2 * self.ls2 if self.ls2 is not None else g_c2
        return (g_u @ self.j_pool.T) / self.num_tokens

    def relevance(self, d_heads: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """LeGrad relevance ``[N, T - prefix]`` from ``dO`` ``[N, T, H*dh]``: ReLU(dO_h V_h^T), mean over h, rows."""
        n, t, _ = d_heads.shape
        h, _, dh = self.v.shape
        return _ReluMeanGrad.apply(d_heads.view(n, t, h, dh), self.v)[:, num_prefix:]


class _TailMap(torch.autograd.Function):
    """``e -> dO`` of one block as an autograd function with the hand-written transpose as its backward."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, terms: _LayerTerms) -> torch.Tensor:
        ctx.terms = terms
        return terms.forward_map(e)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.terms.transpose_map(grad), None


class _ReluMeanGrad(torch.autograd.Function):
    """``r[n, k] = mean_{h, t} relu(sum_j dO[n, t, h, j] V[h, k, j])`` without keeping ``[N, H, T, T]`` alive.

    The gradient with respect to the attention probabilities is formed chunk by chunk over N, in the forward and
    again in the backward (recomputation is cheaper than storing N*H*T*T floats). ``V`` is a constant.
    """

    CHUNK_ELEMENTS = 2**23

    @staticmethod
    def _grad_probs(d_heads: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(d_heads.transpose(1, 2), v.transpose(-1, -2))  # [n, H, T(query), T(key)]

    @staticmethod
    def _chunks(d_heads: torch.Tensor):
        n, t, h, _ = d_heads.shape
        step = max(1, _ReluMeanGrad.CHUNK_ELEMENTS // (h * t * t))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    @staticmethod
    def forward(ctx, d_heads: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d_heads, v)
        _, t, h, _ = d_heads.shape
        out = [
            _ReluMeanGrad._grad_probs(d_heads[sl], v).clamp_min_(0).sum(dim=(1, 2)) / (h * t)
            for sl in _ReluMeanGrad._chunks(d_heads)
        ]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        d_heads, v = ctx.saved_tensors
        _, t, h, _ = d_heads.shape
        grads = []
        for sl in _ReluMeanGrad._chunks(d_heads):
            active = _ReluMeanGrad._grad_probs(d_heads[sl], v) > 0
            d_probs = active * (grad_out[sl] / (h * t))[:, None, None, :]
            grads.append(torch.matmul(d_probs, v).transpose(1, 2))  # [n, T, H, dh]
        return torch.cat(grads), None


def _layer_terms(backbone: TokenGridBackbone, layer: int, record) -> _LayerTerms:
    parts = backbone.block_parts(backbone.blocks[layer])  # not None: checked by decomposition_issue
    out = record.out[0].detach()
    attn_out = record.attn_out[0].detach()
    x_mid = record.x_in[0].detach() + (attn_out * parts.ls1 if parts.ls1 is not None else attn_out)

    def head(m: torch.Tensor) -> torch.Tensor:
        return F.normalize(backbone.legrad_head(m), dim=-1)

    j_pool = torch.func.jacrev(head)(out.mean(dim=0))  # [D, C]
    norm2 = parts.norm2
    mu = x_mid.mean(-1, keepdim=True)
    var = x_mid.var(-1, keepdim=True, unbiased=False)
    inv_sigma = torch.rsqrt(var + norm2.eps)
    xhat = (x_mid - mu) * inv_sigma
    pre_act = parts.fc1(norm2(x_mid))
    with torch.enable_grad():  # the activation is element-wise: the gradient of its sum is its derivative
        z = pre_act.detach().requires_grad_(True)
        (act_grad,) = torch.autograd.grad(parts.act(z).sum(), z)
    c = x_mid.shape[-1]
    gamma = norm2.weight.detach() if norm2.weight is not None else x_mid.new_ones(c)
    w1 = parts.fc1.weight.detach()  # [4C, C]
    w_prime = parts.out_proj_weight.detach()  # [C, H*dh]: attn_out = O @ W_out^T, so dO = d attn_out @ W_out
    if parts.ls1 is not None:
        w_prime = parts.ls1.detach().unsqueeze(1) * w_prime
    return _LayerTerms(
        j_pool=j_pool.detach(),
        ls2=parts.ls2.detach() if parts.ls2 is not None else None,
        w2=parts.fc2.weight.detach(),
        act_grad=act_grad.detach(),
        inv_sigma=inv_sigma,
        w_prime=w_prime,
        m=(w1 * gamma) @ w_prime,
        w1g=(w1 @ gamma) / c,
        x1=((gamma * xhat) @ w1.T) / c,
        r1=w_prime.sum(0),
        r2=xhat @ w_prime,
        v=record.v[0].detach(),
    )


class PerStepStrategy(MapStrategy):
    """Explicit first-order formulas for ``G(e)`` evaluated at every step (one image forward, no double backward)."""

    name = "per_step"

    def __init__(self, backbone, image, layers, num_masks, eps):
        super().__init__(backbone, image, layers, num_masks, eps)
        issue = decomposition_issue(backbone, layers)
        if issue is not None:
            raise UnsupportedModelError(f"the {self.name} strategy cannot run: {issue}; use strategy='naive' or 'auto'")
        self.layers = backbone.layer_indices(layers)
        with torch.no_grad(), AttentionRecorder(backbone.blocks, self.layers, leaf_probs=False) as rec:
            tokens = backbone.forward_blocks(backbone.embed_tokens(image))
            self.image_embedding = backbone.pool_tokens(tokens)
            self.terms = [_layer_terms(backbone, layer, rec.records[layer]) for layer in self.layers]

    def d_heads(self, layer_index: int, e: torch.Tensor) -> torch.Tensor:
        return self.terms[layer_index].d_heads(e)

    def maps(self, e):
        total = 0.0
        for i, terms in enumerate(self.terms):
            relevance = terms.relevance(self.d_heads(i, e), self.backbone.num_prefix_tokens)
            total = total + relevance_to_map(relevance, self.grid, self.backbone.patch_size)
        return min_max(total, self.eps)


class PrecomputedStrategy(PerStepStrategy):
    """``per_step`` with the linear map ``e -> dO`` tabulated once on the D basis vectors (``[D, T*H*dh]``).

    The table (``D * T * H*dh`` floats of the model's dtype per layer, what :func:`estimate_costs` reports and the
    solver checks against ``memory_budget_mb``) is allocated once and filled in place, a chunk of basis vectors at a
    time; a chunk's working memory is about twice its ``[chunk, T, 4C]`` MLP cotangent, which ``chunk_bytes``
    bounds, so the peak stays near the table (measured in docs/maskinversion.md).
    """

    name = "precomputed"

    def __init__(self, backbone, image, layers, num_masks, eps, chunk_bytes: int = 32 * 2**20):
        super().__init__(backbone, image, layers, num_masks, eps)
        d = backbone.embed_dim
        self.tables = []
        with torch.no_grad():
            for terms in self.terms:
                t, hidden = terms.act_grad.shape
                chunk = max(1, chunk_bytes // (terms.m.element_size() * t * hidden))
                eye = torch.eye(d, dtype=terms.m.dtype, device=terms.m.device)
                table = terms.m.new_empty(d, t * terms.m.shape[1])  # [D, T*H*dh]
                for i in range(0, d, chunk):
                    table[i : i + chunk] = terms.d_heads(eye[i : i + chunk]).flatten(1)
                self.tables.append(table)

    def d_heads(self, layer_index, e):
        terms = self.terms[layer_index]
        return (e @ self.tables[layer_index]).view(e.shape[0], terms.num_tokens, -1)


class AttentionPoolStrategy(MapStrategy):
    """LeGrad on an attention-pool head (SigLIP, PE-Core, CoCa): one image forward, a table, no autograd in the model.

    The official recipe differentiates ``s = <e, g(P)>`` with respect to the pool's attention ``P`` ``[H, Q, T']``
    (:func:`~regionembed.explainers.legrad.attention_pool_features` on a block's output, a constant for a fixed
    image: ``g = normalize(f)`` for SigLIP, the raw CoCa pool embedding for CoCa), so ``ds/dP = e @ J`` with
    ``J = dg / dP`` tabulated once per layer (D batched backward passes through the pool only). ``J`` is zero on the
    rows of the queries ``g`` does not read, so the table keeps only the ``Q_s`` queries LeGrad's score reads
    (:attr:`~regionembed.backbones.base.AttentionPoolHead.legrad_pool_queries`: all of them on SigLIP and PE, the
    first of CoCa's 256): ``[D, H*Q_s*T']``. Each step is then ``ReLU(e @ J)`` summed over heads and those queries
    and divided by ``H*Q``, the official mean over heads and *all* queries (the others contribute ``ReLU(0) = 0``):
    a ``[N, D] x [D, H*Q_s*T']`` product. The table takes ``D * H * Q_s * T'`` floats of the model's dtype per layer
    (:func:`attention_pool_table_shape`), which the solver checks against ``memory_budget_mb`` before building this
    strategy (:func:`estimate_costs`).
    """

    name = "attention_pool"
    #: basis vectors per batched backward pass while tabulating: the pass's working memory is a few gradients of the
    #: pool's attention per vector, so a small chunk keeps the peak near the table (measured in docs/maskinversion.md)
    CHUNK = 16

    def __init__(self, backbone, image, layers, num_masks, eps):
        require(backbone, TokenGridBackbone, "MaskInversion with LeGrad maps", alternative=LEGRAD_ALTERNATIVE)
        if not uses_attention_pool(backbone):
            fits = decomposition_issue(backbone, layers) is None
            others = "'auto', 'per_step', 'precomputed' or 'naive'" if fits else "'auto' or 'naive'"
            raise UnsupportedModelError(
                f"the attention_pool strategy needs an attention-pool head; {type(backbone).__name__} pools "
                f"otherwise: use strategy {others}"
            )
        super().__init__(backbone, image, layers, num_masks, eps)
        self.layers = backbone.layer_indices(layers)
        with torch.no_grad(), AttentionRecorder(backbone.blocks, self.layers, leaf_probs=False) as rec:
            tokens = backbone.forward_blocks(backbone.embed_tokens(image))
            self.image_embedding = backbone.pool_tokens(tokens)
        self.tables = []
        for layer in self.layers:
            with torch.enable_grad():
                features, probs = attention_pool_features(backbone, rec.records[layer].out.detach())
                features = features[0]  # [D]
                heads, num_queries, keys = probs.shape[1:]
                queries = legrad_pool_queries(backbone, num_queries)
                rows = slice(None) if len(queries) == num_queries else queries  # all queries: no copy
                eye = torch.eye(features.shape[0], dtype=features.dtype, device=features.device)
                # filled in place, a chunk at a time: the peak is the table and one chunk, not twice the table
                table = features.new_empty(features.shape[0], heads * len(queries) * keys)  # [D, H*Q_s*T']
                for i in range(0, eye.shape[0], self.CHUNK):  # batched backward passes
                    (part,) = torch.autograd.grad(
                        features, probs, grad_outputs=eye[i : i + self.CHUNK], is_grads_batched=True, retain_graph=True
                    )  # [chunk, 1, H, Q, T']
                    table[i : i + self.CHUNK] = part[:, 0, :, rows].flatten(1)
            self.tables.append(table)
            # (H, Q_s, T') of a table row, and Q: the official mean divides by H * Q
            self._shape, self._num_queries = (heads, len(queries), keys), num_queries

    def maps(self, e):
        patches = self.grid[0] * self.grid[1]
        heads = self._shape[0]
        total = 0.0
        for table in self.tables:
            grad = (e @ table).view(e.shape[0], *self._shape)  # [N, H, Q_s, T']
            # the mean over heads and all Q queries: the queries left out of the table have zero gradients
            relevance = grad.clamp_min(0).sum(dim=(1, 2)) / (heads * self._num_queries)
            total = total + relevance[:, -patches:]
        return attention_pool_map(self.backbone, total, self.grid, self.eps)


STRATEGIES: dict[str, type[MapStrategy]] = {
    "naive": NaiveStrategy,
    "naive_lean": NaiveLeanStrategy,
    "per_step": PerStepStrategy,
    "precomputed": PrecomputedStrategy,
    "attention_pool": AttentionPoolStrategy,
}


@dataclass(frozen=True)
class CostEstimate:
    """Multiply-adds and extra memory (bytes) a strategy needs for one inversion (rough, for choosing)."""

    strategy: str
    macs: float
    memory: float


def decomposition_issue(backbone: Backbone, layers: Sequence[int]) -> str | None:
    """Why the decomposed strategies (``per_step``, ``precomputed``) cannot explain ``layers`` of ``backbone``, or
    ``None`` when they can: they need a token-grid backbone whose explained blocks and last block have the pre-norm
    form of :class:`~regionembed.backbones.base.BlockParts` (``block_parts`` is not ``None``)."""
    if not isinstance(backbone, TokenGridBackbone):
        return f"{type(backbone).__name__} is not a token-grid (vision transformer) backbone"
    if uses_attention_pool(backbone):  # LeGrad differentiates the pool's attention, not a block's
        return (
            "LeGrad explains an attention-pool head through the pool's attention, which the formulas do not cover "
            "(the attention_pool strategy does)"
        )
    blocks = backbone.blocks
    for index in sorted({*backbone.layer_indices(layers), len(blocks) - 1}):
        if backbone.block_parts(blocks[index]) is None:
            return f"block {index} ({type(blocks[index]).__name__}) does not have the pre-norm form of the formulas"
    return None


def attention_pool_shape(backbone: TokenGridBackbone, image_size: int) -> tuple[int, int, int]:
    """``(H, Q, T')`` of the pool's attention ``[B, H, Q, T']`` on a square ``image_size`` image of an attention-pool
    backbone (:func:`~regionembed.backbones.base.uses_attention_pool`): heads, queries and the tokens the pool reads.

    :meth:`~regionembed.backbones.base.AttentionPoolHead.attention_pool_shape`: one pool forward of a blank image's
    input tokens (no block runs) the first time, then kept on the backbone per image size.
    """
    return backbone.attention_pool_shape(image_size)


def legrad_pool_queries(backbone: TokenGridBackbone, num_queries: int) -> list[int]:
    """The pool queries LeGrad's score reads, as sorted indices into the pool's ``num_queries`` queries: the rows of
    the pool's attention the ``attention_pool`` table keeps
    (:attr:`~regionembed.backbones.base.AttentionPoolHead.legrad_pool_queries`; ``None`` there: all of them).

    Raises:
        ValueError: the backbone names no query, or one outside ``[0, num_queries)``.
    """
    queries = backbone.legrad_pool_queries
    if queries is None:
        return list(range(num_queries))
    if not queries or any(not 0 <= q < num_queries for q in queries):
        raise ValueError(
            f"{type(backbone).__name__}.legrad_pool_queries={tuple(queries)} must name some of the pool's "
            f"{num_queries} queries (indices 0 to {num_queries - 1})"
        )
    return sorted(set(queries))


def attention_pool_table_shape(backbone: TokenGridBackbone, image_size: int) -> tuple[int, int, int]:
    """``(H, Q_s, T')`` of a row of the ``attention_pool`` table on a square ``image_size`` image: the pool's heads,
    the ``Q_s`` queries LeGrad's score reads (:func:`legrad_pool_queries`) and the tokens the pool reads. The table is
    ``D x H*Q_s*T'`` per explained layer."""
    heads, queries, keys = attention_pool_shape(backbone, image_size)
    return heads, len(legrad_pool_queries(backbone, queries)), keys


def estimate_costs(backbone: TokenGridBackbone, image_size: int, num_masks: int, iterations: int, num_layers: int):
    """Rough cost of each strategy that fits ``backbone``, for ``num_masks`` masks and ``iterations`` steps on a
    square image.

    On an attention-pool head (:func:`~regionembed.backbones.base.uses_attention_pool`) that is ``attention_pool``
    alone: its memory is the table, ``D * H * Q_s * T'`` floats of the model's dtype per layer
    (:func:`attention_pool_table_shape`: only the ``Q_s`` queries LeGrad's score reads), and its multiply-adds the
    ``[N, D] x [D, H*Q_s*T']`` product of every step (forward and backward; the tabulation and the image forward are
    left out: nothing is chosen by them). Otherwise the
    backbone must fit the decomposition (:func:`decomposition_issue` is ``None``) and the result has ``naive``,
    ``naive_lean``, ``per_step`` and ``precomputed``.

    Counts the dominant matrix products: the image forward, the MLP/projection/attention products of the block tail
    per token (``T * (4C*C + C*C) + H*T*T*dh``), a backward at about twice a forward, the N image copies of
    ``naive``, and the ``D`` basis evaluations of ``precomputed``.
    """
    d = backbone.embed_dim
    # the tables take the image tower's dtype (its blocks'; a first parameter such as logit_scale may differ)
    nbytes = float(next(backbone.blocks[0].parameters()).element_size())
    if uses_attention_pool(backbone):
        table = d * math.prod(attention_pool_table_shape(backbone, image_size))  # floats per layer
        macs = num_layers * iterations * 3 * num_masks * table
        return {"attention_pool": CostEstimate("attention_pool", macs, nbytes * num_layers * table)}
    blocks = backbone.blocks
    parts = backbone.block_parts(blocks[-1])
    width = parts.out_proj_weight.shape[0]
    attn_dim = parts.out_proj_weight.shape[1]
    hidden = parts.fc1.weight.shape[0]
    h, dh = parts.num_heads, parts.head_dim
    grid = backbone.grid_size(image_size)
    t = backbone.num_prefix_tokens + math.prod(grid)
    block = t * (3 * width * attn_dim + attn_dim * width + 2 * width * hidden) + 2 * h * t * t * dh
    forward = len(blocks) * block
    tail = t * (hidden * width + width * attn_dim) + h * t * t * dh  # one token vector -> G
    grad_map = h * t * t * dh  # dO -> G
    per_step = forward + num_layers * iterations * 3 * num_masks * tail
    precomputed = forward + num_layers * (d * tail + iterations * 3 * num_masks * (d * t * attn_dim + grad_map))
    naive = num_masks * (forward + num_layers * iterations * 6 * block)
    table_bytes = nbytes * num_layers * d * t * attn_dim
    return {
        "naive": CostEstimate("naive", naive, nbytes * num_masks * t * (width + hidden) * num_layers),
        "naive_lean": CostEstimate("naive_lean", naive * 2 / 3, nbytes * num_masks * t * (width + hidden) * num_layers),
        "per_step": CostEstimate("per_step", per_step, nbytes * num_masks * t * hidden * num_layers),
        "precomputed": CostEstimate("precomputed", precomputed, table_bytes),
    }
