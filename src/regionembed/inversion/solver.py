"""MaskInversion (Bousselham et al., 2024): localized embedding tokens by optimising explainability maps.

Given one image and N region masks, each localized embedding token (LET) starts from the image embedding and is
optimised with AdamW so that its explainability map (LeGrad's, as the paper; any differentiable explainer can be
chosen) matches its mask (soft Dice), optionally regularised towards the image embedding. The model stays frozen;
only the N tokens are optimised, together, in one batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, TokenGridBackbone, require, uses_attention_pool
from ..explainers.base import Explainer
from ..explainers.legrad import LeGrad
from ..grad_mode import require_grad_mode
from ..losses import dice_loss
from .strategies import (
    LEGRAD_ALTERNATIVE,
    STRATEGIES,
    CostEstimate,
    ExplainerStrategy,
    MapStrategy,
    attention_pool_shape,
    attention_pool_table_shape,
    decomposition_issue,
    estimate_costs,
)

__all__ = ["InversionResult", "MaskInversion", "check_masks", "uses_legrad_strategies"]

log = logging.getLogger(__name__)


def check_masks(masks: torch.Tensor) -> torch.Tensor:
    """Validate region masks and return them as float ``[N, H, W]`` in [0, 1].

    Soft (non-binary) masks are allowed as soft targets. Raises ``ValueError`` with the offending index for: a rank
    other than 3, an empty batch or zero-size masks, NaN/inf values, values outside [0, 1] (0/255 masks must be
    divided by 255 first) and all-zero masks.
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {tuple(masks.shape)} (rank {masks.ndim})")
    if masks.shape[0] == 0 or masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"masks must be non-empty, got shape {tuple(masks.shape)}")
    masks = masks.float() if not masks.is_floating_point() else masks
    if not torch.isfinite(masks).all():
        bad = (~torch.isfinite(masks)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"masks {bad} contain NaN or infinite values")
    lo, hi = masks.min().item(), masks.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"mask values must lie in [0, 1], got [{lo:g}, {hi:g}]; divide 0/255 masks by 255 "
            "(regionembed.io.load_mask does this for image files)"
        )
    empty = (masks.flatten(1).amax(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"masks {empty} are empty (all zeros): there is no region to invert")
    return masks


def _table_shape(strategy: str, backbone: TokenGridBackbone, image_size: int) -> str:
    """The dimensions of a table strategy's table, for the over-budget error: ``D x ...`` per explained layer."""
    if strategy == "attention_pool":
        heads, read, keys = attention_pool_table_shape(backbone, image_size)
        queries = attention_pool_shape(backbone, image_size)[1]
        of = "" if read == queries else f" of {queries}, those LeGrad reads"
        return f"D={backbone.embed_dim} x H={heads} x Q={read}{of} x T'={keys}"
    parts = backbone.block_parts(backbone.blocks[-1])
    tokens = backbone.num_prefix_tokens + math.prod(backbone.grid_size(image_size))
    return f"D={backbone.embed_dim} x T={tokens} x C={parts.out_proj_weight.shape[1]}"


@dataclass
class InversionResult:
    """What :class:`MaskInversion` returns for one image.

    Attributes:
        embeddings: ``[N, D]`` localized embeddings (the optimised tokens, not normalised, as the official code).
        maps: ``[N, H, W]`` the explainer's maps of the returned embeddings, resized to the mask resolution.
        loss_history: ``[iterations + 1]`` total loss before each step and, last, of the returned embeddings.
        mask_loss: ``[N]`` per-mask Dice loss of the returned embeddings.
        strategy: the map strategy that ran (``"explainer"``: the generic autograd path).
        image_embedding: ``[1, D]`` the image's embedding (the starting point).
        embedding_history: ``[iterations + 1, N, D]`` the tokens before each step and, last, the returned ones.
        mask_loss_history: ``[iterations + 1, N]`` per-mask Dice loss of the same tokens (diagnostics: how accuracy
            and Dice move together over the optimisation, issue 13).
    """

    embeddings: torch.Tensor
    maps: torch.Tensor
    loss_history: torch.Tensor
    mask_loss: torch.Tensor
    strategy: str
    image_embedding: torch.Tensor = field(repr=False, default=None)
    embedding_history: torch.Tensor = field(repr=False, default=None)
    mask_loss_history: torch.Tensor = field(repr=False, default=None)


Strategy = Literal["auto", "naive", "naive_lean", "per_step", "precomputed", "attention_pool"]


def uses_legrad_strategies(explainer: Explainer) -> bool:
    """Whether ``explainer`` is the official LeGrad (mean-token route), the one explainer the decomposed and naive
    strategies compute; any other explainer (a LeGrad subclass, ``pooling="model"``, Grad-CAM, ...) runs the generic
    ``explainer`` path."""
    return type(explainer) is LeGrad and explainer.pooling == "mean"


class MaskInversion:
    """The MaskInversion solver: ``solver(backbone, image [1, 3, S, S], masks [N, H, W]) -> InversionResult``.

    The one place for MaskInversion's hyper-parameters: the module, the region method and the localization
    evaluation all take a ``MaskInversion`` (built from YAML by jsonargparse). The solver owns no model: the backbone
    is an argument of each call, like an explainer's; a call keeps no state. Defaults reproduce the official
    implementation (maskinversion-torch 1.1: LeGrad on the last block, lr 0.5, 10 steps, no regulariser).

    Args:
        explainer: the differentiable explainer whose maps are matched to the masks; ``None`` means ``LeGrad()``
            (the last block). Its own settings are used as given (LeGrad's ``layers`` and ``eps`` included). The
            official LeGrad (``pooling="mean"``) has the fast strategies; any other differentiable explainer
            (``LeGrad(pooling="model")``, ``GradCAM(normalize=False)``, ...) runs the generic ``explainer`` path:
            the explainer recomputed with ``create_graph`` at every step.
        lr: AdamW learning rate of the tokens (0.5, as the official README uses).
        iterations: optimisation steps.
        alpha: weight of the ``1 - cos(LET, image embedding)`` regulariser.
        weight_decay: AdamW weight decay.
        strategy: how LeGrad maps are computed: ``"auto"`` (by cost and ``memory_budget_mb``; ``"explainer"`` for
            explainers other than the official LeGrad; ``"attention_pool"`` on an attention-pool head), ``"naive"``,
            ``"naive_lean"``, ``"per_step"``, ``"precomputed"`` or ``"attention_pool"`` (attention-pool heads:
            SigLIP, SigLIP2, PE-Core, CoCa, HF SigLIP; see :mod:`regionembed.inversion.strategies`; these need the
            official LeGrad).
        memory_budget_mb: largest table (``precomputed``, ``attention_pool``) a call may allocate; over it,
            ``auto`` runs ``per_step`` (or ``naive`` on an attention-pool head) and an explicit
            ``strategy="precomputed"`` or ``"attention_pool"`` raises ``ValueError``.

    Raises:
        ValueError: a setting out of range, an explainer that is not differentiable, or a fixed strategy with an
            explainer it cannot compute.
    """

    def __init__(
        self,
        explainer: Explainer | None = None,
        lr: float = 0.5,
        iterations: int = 10,
        alpha: float = 0.0,
        weight_decay: float = 0.0,
        strategy: Strategy = "auto",
        memory_budget_mb: float = 2048.0,
    ) -> None:
        if isinstance(explainer, Backbone):  # the 0.1 signature MaskInversion(backbone, ...): say what changed
            raise TypeError(
                "MaskInversion no longer takes the backbone at construction: build it with its settings and pass "
                "the backbone to each call, MaskInversion(**settings)(backbone, image, masks) (see CHANGELOG)"
            )
        explainer = LeGrad() if explainer is None else explainer
        if not isinstance(explainer, Explainer):
            raise TypeError(f"explainer must be a regionembed Explainer, got {type(explainer).__name__}")
        if not explainer.differentiable:
            raise ValueError(
                f"{type(explainer).__name__} is not differentiable and cannot drive MaskInversion; "
                "use a differentiable explainer such as LeGrad"
            )
        if strategy not in {"auto", *STRATEGIES}:
            raise ValueError(f"unknown strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}")
        if strategy != "auto" and not uses_legrad_strategies(explainer):
            raise ValueError(
                f"strategy {strategy!r} computes the official LeGrad (pooling='mean') only, not {explainer!r}; "
                "use strategy 'auto', which runs other explainers on the generic 'explainer' path"
            )
        if iterations < 0 or not lr > 0 or weight_decay < 0 or alpha < 0 or not memory_budget_mb >= 0:
            raise ValueError(
                f"iterations, weight_decay, alpha and memory_budget_mb must be >= 0 and lr > 0, got "
                f"iterations={iterations}, lr={lr}, weight_decay={weight_decay}, alpha={alpha}, "
                f"memory_budget_mb={memory_budget_mb}"
            )
        self.explainer = explainer
        self.lr = float(lr)
        self.iterations = int(iterations)
        self.alpha = float(alpha)
        self.weight_decay = float(weight_decay)
        self.strategy = strategy
        self.memory_budget_mb = float(memory_budget_mb)

    def settings(self) -> dict[str, Any]:
        """Every setting that determines the result, as plain values (for run fingerprints and reports)."""
        explainer = self.explainer
        return {
            "explainer": f"{type(explainer).__module__}.{type(explainer).__qualname__}",
            "explainer_args": {k: repr(v) for k, v in sorted(vars(explainer).items()) if not k.startswith("_")},
            "lr": self.lr,
            "iterations": self.iterations,
            "alpha": self.alpha,
            "weight_decay": self.weight_decay,
            "strategy": self.strategy,
            "memory_budget_mb": self.memory_budget_mb,
        }

    def check(self, backbone: Backbone) -> None:
        """Check the settings against ``backbone`` now (a LeGrad layer out of range would otherwise surface mid-run).

        Raises:
            UnsupportedModelError: LeGrad maps on a backbone without a token grid (names the alternative).
            ValueError: naming ``layers`` and the model's number of blocks.
        """
        if not isinstance(self.explainer, LeGrad):
            return
        require(backbone, TokenGridBackbone, "MaskInversion with LeGrad maps", alternative=LEGRAD_ALTERNATIVE)
        layers = self.explainer.layers
        try:
            backbone.layer_indices(layers)
        except ValueError as err:
            raise ValueError(f"layers={list(layers)}: {err} (negative indices count from the end)") from err

    def plan(self, backbone: Backbone, image_size: int, num_masks: int) -> str:
        """The strategy a call runs for ``num_masks`` masks on a square ``image_size`` image of ``backbone``.

        :meth:`plan_with_reason` without the reason.

        Raises:
            ValueError: ``strategy="precomputed"`` or ``"attention_pool"`` whose table
                (:func:`~regionembed.inversion.strategies.estimate_costs`) is larger than ``memory_budget_mb``;
                ``auto`` falls back to ``per_step`` (``naive`` on an attention-pool head) instead.
        """
        return self.plan_with_reason(backbone, image_size, num_masks)[0]

    def plan_with_reason(self, backbone: Backbone, image_size: int, num_masks: int) -> tuple[str, str]:
        """:meth:`plan` and why: ``(strategy, reason)``, the reason ``auto`` logs when it falls back or picks
        ``attention_pool`` (e.g. ``"the attention_pool table, about 6.0 MB, is over memory_budget_mb=1"``).

        Raises:
            ValueError: as :meth:`plan`.
        """
        if not uses_legrad_strategies(self.explainer):
            return "explainer", f"{self.explainer!r} is not the official LeGrad: the generic explainer path"
        layers = self.explainer.layers
        # LeGrad on an attention-pool head differentiates the pool's attention: its own tabulated strategy, if the
        # table fits the budget
        if uses_attention_pool(backbone) and self.strategy in ("auto", "attention_pool"):
            tables = len(backbone.layer_indices(layers))  # one table per distinct block ((11, -1) is one on ViT-B)
            table = estimate_costs(backbone, image_size, num_masks, self.iterations, tables)["attention_pool"]
            over = self._over_budget(table, backbone, image_size, tables, fallback="naive")
            if over is not None:
                return self._auto("naive", over)
            return self._auto("attention_pool", "LeGrad through the attention-pool head")
        if self.strategy not in ("auto", "precomputed"):
            return self.strategy, f"strategy={self.strategy!r} as set"
        issue = decomposition_issue(backbone, layers)
        if issue is not None:
            if self.strategy == "precomputed":  # its constructor refuses the backbone, naming the issue and the way out
                return "precomputed", f"strategy='precomputed' as set, though {issue}"
            return self._auto("naive", f"no decomposed strategy: {issue}")
        tables = len(backbone.layer_indices(layers))  # one table per distinct block
        costs = estimate_costs(backbone, image_size, num_masks, self.iterations, tables)
        pre, per = costs["precomputed"], costs["per_step"]
        if self.strategy == "auto" and not pre.macs < per.macs:
            return "per_step", "the decomposed formulas fit; per_step predicted cheaper than precomputed"
        over = self._over_budget(pre, backbone, image_size, tables, fallback="per_step")
        if over is not None:
            return self._auto("per_step", over)
        if self.strategy == "auto":
            return "precomputed", "the decomposed formulas fit; precomputed predicted cheaper than per_step"
        return "precomputed", "strategy='precomputed' as set"

    def _auto(self, name: str, reason: str) -> tuple[str, str]:
        """``(name, reason)``; the reason is logged when ``auto`` chose ``name`` (a fallback, or the pool strategy)."""
        if self.strategy == "auto":
            log.info("MaskInversion: strategy auto runs %r (%s)", name, reason)
        return name, reason

    def _over_budget(
        self, cost: CostEstimate, backbone: Backbone, image_size: int, layers: int, fallback: str
    ) -> str | None:
        """``None`` when a table strategy's memory (``precomputed``, ``attention_pool``) fits ``memory_budget_mb``,
        else why ``auto`` runs ``fallback`` instead; an explicit strategy over the budget raises ``ValueError`` naming
        the estimate, the table's shape and ``memory_budget_mb``."""
        if cost.memory <= self.memory_budget_mb * 2**20:
            return None
        if self.strategy == cost.strategy:
            raise ValueError(
                f"strategy {cost.strategy!r} would tabulate about {cost.memory / 2**20:.1f} MB "
                f"({_table_shape(cost.strategy, backbone, image_size)} floats for each of {layers} layer(s)), more "
                f"than memory_budget_mb={self.memory_budget_mb:g}; raise memory_budget_mb, explain fewer layers, or "
                f"use strategy 'auto', which runs {fallback!r} instead"
            )
        return (
            f"the {cost.strategy} table, about {cost.memory / 2**20:.1f} MB, is over "
            f"memory_budget_mb={self.memory_budget_mb:g}"
        )

    def _strategy(self, backbone: Backbone, image: torch.Tensor, num_masks: int) -> MapStrategy:
        name = self.plan(backbone, image.shape[-1], num_masks)
        if name == "explainer":
            return ExplainerStrategy(backbone, image, num_masks, explainer=self.explainer)
        layers, eps = self.explainer.layers, self.explainer.eps
        return STRATEGIES[name](backbone, image, layers, num_masks, eps)

    def __call__(self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> InversionResult:
        """Invert ``masks`` ``[N, H, W]`` (any resolution, values in [0, 1]) on ``image`` ``[1, 3, S, S]``.

        ``backbone`` is frozen for the call (only the tokens are optimised); the naive strategies restore its
        parameters' ``requires_grad`` and ``.grad`` afterwards.
        """
        require_grad_mode("MaskInversion")
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"MaskInversion is called as solver(backbone, image, masks), got a {type(backbone).__name__} first"
            )
        self.check(backbone)
        backbone.check_image(image)
        if image.shape[0] != 1:
            raise ValueError(f"MaskInversion takes one image [1, 3, S, S] per call, got a batch of {image.shape[0]}")
        masks = check_masks(masks).to(device=image.device, dtype=image.dtype)
        n = masks.shape[0]
        strategy = self._strategy(backbone, image, n)
        log.debug("MaskInversion: %d masks, %d iterations, strategy %s", n, self.iterations, strategy.name)

        image_embedding = strategy.image_embedding.detach().expand(n, -1)
        target = F.normalize(image_embedding, dim=-1)
        let = image_embedding.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([let], lr=self.lr, weight_decay=self.weight_decay)

        def loss_of(tokens: torch.Tensor):
            e = F.normalize(tokens, dim=-1)
            maps = F.interpolate(strategy.maps(e).unsqueeze(1), size=masks.shape[-2:], mode="bilinear")[:, 0]
            per_mask = dice_loss(maps, masks, reduction="none")
            loss = per_mask.mean()
            if self.alpha:
                loss = loss + self.alpha * (1 - (target * e).sum(-1)).mean()
            return loss, maps, per_mask

        history, tokens, dice = [], [], []
        try:
            with torch.enable_grad():
                for _ in range(self.iterations):
                    loss, _, step_dice = loss_of(let)
                    if not torch.isfinite(loss):
                        raise FloatingPointError("MaskInversion loss became NaN/inf; check the image and the backbone")
                    tokens.append(let.detach().clone())
                    dice.append(step_dice.detach())
                    let.grad = strategy.gradient(loss, let)
                    optimizer.step()
                    history.append(loss.detach())
                # maps of the tokens actually returned (the official code returns those of the previous step)
                loss, maps, per_mask = loss_of(let)
        finally:
            strategy.close()
        history.append(loss.detach())
        tokens.append(let.detach())
        dice.append(per_mask.detach())
        return InversionResult(
            embeddings=let.detach(),
            maps=maps.detach(),
            loss_history=torch.stack(history),
            mask_loss=per_mask.detach(),
            strategy=strategy.name,
            image_embedding=strategy.image_embedding.detach(),
            embedding_history=torch.stack(tokens),
            mask_loss_history=torch.stack(dice),
        )

    def __repr__(self) -> str:
        return (
            f"MaskInversion(explainer={self.explainer!r}, lr={self.lr}, iterations={self.iterations}, "
            f"alpha={self.alpha}, weight_decay={self.weight_decay}, strategy={self.strategy!r}, "
            f"memory_budget_mb={self.memory_budget_mb})"
        )
