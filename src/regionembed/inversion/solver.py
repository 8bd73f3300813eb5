"""MaskInversion (Bousselham et al., 2024): localized embedding tokens by optimising explainability maps.

Given one image and N region masks, each localized embedding token (LET) starts from the image embedding and is
optimised with AdamW so that its LeGrad map matches its mask (soft Dice), optionally regularised towards the image
embedding. The model stays frozen; only the N tokens are optimised, together, in one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, uses_attention_pool
from ..explainers.base import Explainer
from ..explainers.legrad import LeGrad
from ..losses import dice_loss
from .strategies import STRATEGIES, ExplainerStrategy, MapStrategy, estimate_costs

__all__ = ["InversionResult", "MaskInversion", "MaskInversionConfig", "check_masks"]

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


@dataclass(frozen=True)
class MaskInversionConfig:
    """Hyper-parameters of the solver. Defaults reproduce the official implementation (maskinversion-torch 1.1).

    Attributes:
        layers: LeGrad layers (official MaskInversion: the last block only).
        lr: AdamW learning rate (0.5, as the official README uses).
        iterations: optimisation steps.
        alpha: weight of the ``1 - cos(LET, image embedding)`` regulariser.
        weight_decay: AdamW weight decay.
        strategy: ``"auto"``, ``"naive"``, ``"naive_lean"``, ``"per_step"``, ``"precomputed"`` or ``"attention_pool"``
            (attention-pool heads; see ``strategies``).
        memory_budget_mb: largest precomputed table ``auto`` may allocate.
        eps: min-max range floor.
    """

    layers: tuple[int, ...] = (-1,)
    lr: float = 0.5
    iterations: int = 10
    alpha: float = 0.0
    weight_decay: float = 0.0
    strategy: str = "auto"
    memory_budget_mb: float = 2048.0
    eps: float = 1e-12

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if self.strategy not in {"auto", *STRATEGIES}:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from auto, {', '.join(STRATEGIES)}")
        if self.iterations < 0 or not self.lr > 0 or self.weight_decay < 0 or self.alpha < 0:
            raise ValueError(
                f"iterations, weight_decay and alpha must be >= 0 and lr > 0, got iterations={self.iterations}, "
                f"lr={self.lr}, weight_decay={self.weight_decay}, alpha={self.alpha}"
            )


@dataclass
class InversionResult:
    """What :class:`MaskInversion` returns for one image.

    Attributes:
        embeddings: ``[N, D]`` localized embeddings (the optimised tokens, not normalised, as the official code).
        maps: ``[N, H, W]`` LeGrad maps of the returned embeddings, resized to the mask resolution.
        loss_history: ``[iterations + 1]`` total loss before each step and, last, of the returned embeddings.
        mask_loss: ``[N]`` per-mask Dice loss of the returned embeddings.
        strategy: the map strategy that ran.
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


class MaskInversion:
    """The MaskInversion solver: ``solver(image [1, 3, S, S], masks [N, H, W]) -> InversionResult``.

    Hyper-parameters are fixed at construction (see :class:`MaskInversionConfig`); a call keeps no state.

    Args:
        backbone: a regionembed backbone (frozen during the call; only the tokens are optimised).
        explainer: the differentiable explainer producing the maps; ``None`` means LeGrad on ``layers``, the only
            explainer with the fast decomposed strategies. Other explainers run the generic autograd path.
        **config: fields of :class:`MaskInversionConfig`.
    """

    def __init__(self, backbone: Backbone, explainer: Explainer | None = None, **config) -> None:
        self.backbone = backbone
        self.config = MaskInversionConfig(**config)
        if explainer is not None and not isinstance(explainer, LeGrad) and not explainer.differentiable:
            raise ValueError(
                f"{type(explainer).__name__} is not differentiable and cannot drive MaskInversion; "
                "use a differentiable explainer such as LeGrad"
            )
        if isinstance(explainer, LeGrad) and explainer.pooling == "mean":  # the official LeGrad: fast strategies
            self.config = MaskInversionConfig(**{**self.config.__dict__, "layers": explainer.layers})
            explainer = None
        self.explainer = explainer
        if explainer is None:  # check now: an index out of range would otherwise surface mid-run as an IndexError
            try:
                backbone.layer_indices(self.config.layers)
            except ValueError as err:
                raise ValueError(
                    f"layers={list(self.config.layers)}: {err} (negative indices count from the end)"
                ) from err

    def plan(self, image_size: int, num_masks: int) -> str:
        """The strategy ``auto`` picks for ``num_masks`` masks on a square ``image_size`` image."""
        cfg = self.config
        if self.explainer is not None:
            return "explainer"
        if cfg.strategy != "auto":
            return cfg.strategy
        if uses_attention_pool(self.backbone):
            log.info(
                "MaskInversion strategy auto: %s pools with an attention pool (LeGrad differentiates the pool's "
                "attention, not a block's); using 'attention_pool'",
                type(self.backbone).__name__,
            )
            return "attention_pool"
        try:
            costs = estimate_costs(self.backbone, image_size, num_masks, cfg.iterations, len(cfg.layers))
        except NotImplementedError as err:
            log.info("MaskInversion strategy auto: %s; using 'naive'", err)
            return "naive"
        pre, per = costs["precomputed"], costs["per_step"]
        if pre.macs < per.macs and pre.memory <= cfg.memory_budget_mb * 2**20:
            return "precomputed"
        return "per_step"

    def _strategy(self, image: torch.Tensor, num_masks: int) -> MapStrategy:
        cfg = self.config
        name = self.plan(image.shape[-1], num_masks)
        if name == "explainer":
            return ExplainerStrategy(self.backbone, image, cfg.layers, num_masks, cfg.eps, explainer=self.explainer)
        if name in ("per_step", "precomputed") and not uses_attention_pool(self.backbone):  # those it refuses
            try:
                self.backbone.block_parts(self.backbone.blocks[cfg.layers[0]])
            except NotImplementedError as err:
                if cfg.strategy != "auto":
                    raise
                log.info("MaskInversion strategy auto: %s; using 'naive'", err)
                name = "naive"
        return STRATEGIES[name](self.backbone, image, cfg.layers, num_masks, cfg.eps)

    def __call__(self, image: torch.Tensor, masks: torch.Tensor) -> InversionResult:
        """Invert ``masks`` ``[N, H, W]`` (any resolution, values in [0, 1]) on ``image`` ``[1, 3, S, S]``."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MaskInversion optimises tokens with autograd and cannot run under torch.inference_mode(); "
                "with Lightning set `trainer.inference_mode: false` (the shipped configs do)"
            )
        self.backbone.check_image(image)
        if image.shape[0] != 1:
            raise ValueError(f"MaskInversion takes one image [1, 3, S, S] per call, got a batch of {image.shape[0]}")
        masks = check_masks(masks).to(device=image.device, dtype=image.dtype)
        cfg = self.config
        n = masks.shape[0]
        strategy = self._strategy(image, n)
        log.debug("MaskInversion: %d masks, %d iterations, strategy %s", n, cfg.iterations, strategy.name)

        image_embedding = strategy.image_embedding.detach().expand(n, -1)
        target = F.normalize(image_embedding, dim=-1)
        let = image_embedding.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([let], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def loss_of(tokens: torch.Tensor):
            e = F.normalize(tokens, dim=-1)
            maps = F.interpolate(strategy.maps(e).unsqueeze(1), size=masks.shape[-2:], mode="bilinear")[:, 0]
            per_mask = dice_loss(maps, masks, reduction="none")
            loss = per_mask.mean()
            if cfg.alpha:
                loss = loss + cfg.alpha * (1 - (target * e).sum(-1)).mean()
            return loss, maps, per_mask

        history, tokens, dice = [], [], []
        try:
            with torch.enable_grad():
                for _ in range(cfg.iterations):
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
        return f"MaskInversion({self.config})"
