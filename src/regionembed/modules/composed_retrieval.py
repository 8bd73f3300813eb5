"""Composed image retrieval (reference image + modifier text -> target image) with a gradient-attention loss.

A configurable reconstruction of MMGrad (Udhayanan et al., 2023; see :mod:`regionembed.explainers.grad_attention`
for what is known and what is our choice). The query is the composition of the reference image's embedding and the
modifier's text embedding (:class:`SumCombiner`, or :class:`LearnedCombiner` after CLIP4Cir); targets are image
embeddings; the retrieval loss is InfoNCE of each query against the targets of the whole (gathered) batch. With
``attn_weight > 0`` a second term pulls the gradient-attention map of the query-target score on the reference image
onto the changed region (``attn_loss``: Dice, BCE or energy outside the mask), trained end to end through the
second-order backward.

Evaluation: Recall@K over a gallery of the split's target (and reference) images, the query's own reference
excluded, and the map's grounding on the changed region (IoU, Dice, pointing game, energy pointing game) when the
data has changed-region masks.

MaskInversion's gradient decomposition (:mod:`regionembed.inversion.strategies`) does not apply here: it treats the
explained block's Jacobian as a constant of a frozen model, while this loss must reach the image tower's weights
through that Jacobian (the second-order term). It would apply only with the image tower frozen; with the default
last-block map the double backward runs through one block and the head and costs about 9% of a training step
(``python scripts/gradattn_report.py --step-timing 10``), which bounds any saving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed.nn  # all_gather with gradients
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..explainers.grad_attention import Pooling, grad_attention_maps
from ..losses.attention import AttentionLossKind, attention_loss
from ..metrics import MapMaskAgreement
from ..metrics.functional import recall_at_k
from .contrastive import check_optimizer_settings, cosine_with_warmup, param_groups

__all__ = [
    "ComposedRetrievalModule",
    "LearnedCombiner",
    "SumCombiner",
    "build_gallery",
    "composed_info_nce",
    "gather_rows",
]

TOWERS = ("image", "text", "logit_scale")


class SumCombiner(nn.Module):
    """``normalize(normalize(image) + normalize(text))``: the training-free baseline.

    Args:
        dim: embedding dimension D (unused; for a signature shared with :class:`LearnedCombiner`).
    """

    def __init__(self, dim: int = 0) -> None:
        super().__init__()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image and text embeddings -> ``[B, D]`` unit-norm queries."""
        return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class LearnedCombiner(nn.Module):
    """The CLIP4Cir combiner (Baldrati et al., 2022), small.

    Image and text embeddings are projected (Linear, ReLU, dropout) and concatenated; one branch maps the pair to an
    output embedding, another to a mixing weight ``lam`` in (0, 1); the query is
    ``normalize(out + lam * text + (1 - lam) * image)`` (unit-norm inputs). Our choice: the output layer starts at
    zero, so training starts from a weighted sum (the :class:`SumCombiner` direction at ``lam = 0.5``).

    Args:
        dim: embedding dimension D.
        proj_dim: width of the two projections.
        hidden_dim: width of the combining layers.
        dropout: dropout after the projections and hidden layers.
    """

    def __init__(self, dim: int, proj_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"LearnedCombiner needs the embedding dimension, got dim={dim}")
        self.image_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.combine = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.output = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.mix = nn.Sequential(
            nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1), nn.Sigmoid()
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image and text embeddings -> ``[B, D]`` unit-norm queries."""
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be [B, D]")
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        pair = torch.cat([self.image_proj(image), self.text_proj(text)], dim=-1)
        lam = self.mix(pair)
        return F.normalize(self.output(self.combine(pair)) + lam * text + (1 - lam) * image, dim=-1)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def composed_info_nce(query: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """InfoNCE of each query against the targets of the whole batch, gathered across ranks with gradients.

    As open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``, one direction (query -> target, as
    CLIP4Cir): rank ``r`` scores its ``B`` queries against all ``W * B`` targets; DDP's gradient averaging then
    gives exactly the gradient of the loss on the concatenated batch (equal ``B`` on every rank, as the training
    sampler guarantees).

    Args:
        query: ``[B, D]`` unit-norm queries of this rank.
        target: ``[B, D]`` unit-norm targets of this rank (row ``i`` is query ``i``'s positive).
        logit_scale: multiplier of the cosines (``exp`` of CLIP's learnt log-scale).

    Returns:
        The mean cross-entropy over this rank's queries.
    """
    if query.shape != target.shape or query.ndim != 2:
        raise ValueError(f"query {tuple(query.shape)} and target {tuple(target.shape)} must both be [B, D]")
    world, rank = _world()
    all_targets = target
    offset = 0
    if world > 1:
        all_targets = torch.cat(torch.distributed.nn.all_gather(target), dim=0)
        offset = rank * query.shape[0]
    logits = logit_scale * query @ all_targets.T
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, labels)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n_r, ...]`` of every rank in rank order (uneven ``n_r`` allowed, no gradient)."""
    world, _ = _world()
    if world == 1:
        return x
    dist = torch.distributed
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    largest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def build_gallery(
    keys: torch.Tensor, embeddings: torch.Tensor, target_keys: torch.Tensor, reference_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deduplicate gallery images by key and locate each query's target and reference in it.

    Args:
        keys: ``[M]`` int64 image keys of the gallery candidates (the same image may come several times).
        embeddings: ``[M, D]`` their embeddings.
        target_keys: ``[Q]`` key of each query's target (must be among ``keys``).
        reference_keys: ``[Q]`` key of each query's reference image.

    Returns:
        ``(gallery [G, D], target [Q], exclude [Q])``: indices into the gallery; ``exclude`` is ``-1`` where the
        reference is not in the gallery.
    """
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
    gallery = embeddings[first]

    def locate(k: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(uniq, k).clamp_max(len(uniq) - 1)
        return torch.where(uniq[pos] == k, pos, torch.full_like(pos, -1))

    target = locate(target_keys)
    if bool((target < 0).any()):
        raise ValueError("some targets are not in the gallery")
    exclude = locate(reference_keys)
    exclude = torch.where(exclude == target, torch.full_like(exclude, -1), exclude)
    return gallery, target, exclude


class ComposedRetrievalModule(L.LightningModule):
    """Composed image retrieval on the shared backbone adapter, with an optional gradient-attention loss.

    Batches (:func:`~regionembed.data.composed.collate_composed`): ``reference`` and ``target`` ``[B, 3, S, S]``,
    ``modifier`` (B strings), ``mask`` ``[B, S, S]`` changed-region masks or ``None``, ``reference_key`` and
    ``target_key`` ``[B]`` int64 gallery keys of the two images, ``index`` ``[B]`` item indices.

    Args:
        backbone: an open_clip backbone (image and text towers).
        combiner: ``"sum"`` (:class:`SumCombiner`) or ``"learned"`` (:class:`LearnedCombiner`).
        combiner_proj_dim: projection width of the learned combiner.
        combiner_hidden_dim: hidden width of the learned combiner.
        combiner_dropout: dropout of the learned combiner.
        train_towers: which parts of the backbone train, a subset of ``image``, ``text``, ``logit_scale`` (the
            combiner always trains); the rest is frozen.
        logit_scale: fixed multiplier of the cosines in InfoNCE; ``None`` uses the backbone's ``exp(logit_scale)``.
        attn_weight: lambda, the weight of the attention loss (0: retrieval only; maps are still evaluated).
        attn_loss: ``"dice"``, ``"bce"`` or ``"energy"`` (:func:`~regionembed.losses.attention_loss`).
        attn_layer: block of the reference image tower the gradient is taken at.
        attn_pooling: ``"legrad"`` (attention probabilities) or ``"gradcam"`` (block output tokens).
        attn_score: ``"query"``: ``cos(combine(ref, text), target)``; ``"both"``: ``cos(combine(ref, text),
            combine(target, text))`` (both sides composed with the modifier).
        gallery: ``"targets"``: the split's target images; ``"targets_and_references"``: also the reference images
            (each query's own reference is always excluded), as CIRR's gallery of all split images.
        eval_maps: compute maps and grounding metrics in validation/test (needs masks and inference mode off).
        recall_k: the Recall@K cut-offs.
        lr: peak AdamW learning rate of the backbone.
        combiner_lr: learning rate of the combiner (default: ``lr``).
        weight_decay: AdamW weight decay (not on biases, norms, logit scale).
        warmup_steps: linear warmup before the cosine decay.
        betas: AdamW betas.
    """

    def __init__(
        self,
        backbone: Backbone,
        combiner: Literal["sum", "learned"] = "learned",
        combiner_proj_dim: int = 256,
        combiner_hidden_dim: int = 512,
        combiner_dropout: float = 0.1,
        train_towers: Sequence[str] = ("image", "text"),
        logit_scale: float | None = None,
        attn_weight: float = 0.0,
        attn_loss: AttentionLossKind = "dice",
        attn_layer: int = -1,
        attn_pooling: Pooling = "legrad",
        attn_score: Literal["query", "both"] = "query",
        gallery: Literal["targets", "targets_and_references"] = "targets_and_references",
        eval_maps: bool = True,
        recall_k: Sequence[int] = (1, 5, 10, 50),
        lr: float = 1e-5,
        combiner_lr: float | None = None,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr=lr, combiner_lr=combiner_lr, warmup_steps=warmup_steps)
        self.save_hyperparameters(ignore=["backbone"])
        unknown = set(train_towers) - set(TOWERS)
        if unknown:
            raise ValueError(f"unknown towers {sorted(unknown)} in train_towers; choose from {list(TOWERS)}")
        if attn_weight < 0:
            raise ValueError(f"attn_weight must be >= 0, got {attn_weight}")
        if attn_score not in ("query", "both"):
            raise ValueError(f"unknown attn_score {attn_score!r}; choose 'query' or 'both'")
        if gallery not in ("targets", "targets_and_references"):
            raise ValueError(f"unknown gallery {gallery!r}")
        if attn_pooling not in ("legrad", "gradcam"):
            raise ValueError(f"unknown attn_pooling {attn_pooling!r}")
        self.backbone = backbone
        if combiner == "sum":
            self.combiner: nn.Module = SumCombiner(backbone.embed_dim)
        elif combiner == "learned":
            self.combiner = LearnedCombiner(
                backbone.embed_dim, combiner_proj_dim, combiner_hidden_dim, combiner_dropout
            )
        else:
            raise ValueError(f"unknown combiner {combiner!r}; choose 'sum' or 'learned'")
        self._freeze(set(train_towers))
        self.grounding = nn.ModuleDict({s: MapMaskAgreement() for s in ("val", "test")})
        self._store: dict[str, list[dict[str, torch.Tensor]]] = {}

    # ------------------------------------------------------------------------------------------------ parts
    def _freeze(self, towers: set[str]) -> None:
        model = self.backbone.model
        self.backbone.requires_grad_(False)
        if "image" in towers:
            model.visual.requires_grad_(True)
        if "text" in towers:
            # every parameter outside the image tower, except the logit scale, belongs to the text tower
            for name, p in model.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    p.requires_grad_(True)
        if "logit_scale" in towers:
            model.logit_scale.requires_grad_(True)

    def scale(self) -> torch.Tensor:
        if self.hparams.logit_scale is not None:
            return torch.tensor(float(self.hparams.logit_scale), device=self.device)
        return self.backbone.logit_scale.exp()

    def encode_text(self, modifiers: Sequence[str]) -> torch.Tensor:
        return self.backbone.encode_text(self.backbone.tokenize(list(modifiers)).to(self.device))

    def forward_batch(
        self, batch: dict[str, Any], maps: bool, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries, targets (unit norm, ``[B, D]``), reference embeddings and, with ``maps``, the attention maps."""
        text = self.encode_text(batch["modifier"])
        target = self.backbone.encode_image(batch["target"])
        if maps:
            score_target = F.normalize(
                self.combiner(target, text) if self.hparams.attn_score == "both" else target, dim=-1
            )

            def score(features: torch.Tensor) -> torch.Tensor:
                return (self.combiner(features, text) * score_target).sum(-1)

            attn, reference = grad_attention_maps(
                self.backbone,
                batch["reference"],
                score,
                self.hparams.attn_layer,
                self.hparams.attn_pooling,
                create_graph=create_graph,
            )
        else:
            attn, reference = None, self.backbone.encode_image(batch["reference"])
        query = self.combiner(reference, text)
        return query, F.normalize(target, dim=-1), F.normalize(reference, dim=-1), attn

    # ------------------------------------------------------------------------------------------------ train
    def on_fit_start(self) -> None:
        self.backbone.train()  # adapters are built in eval mode

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        lam = float(self.hparams.attn_weight)
        if lam > 0 and batch.get("mask") is None:
            raise ValueError("attn_weight > 0 needs changed-region masks in the batch (this data has none)")
        query, target, _, maps = self.forward_batch(batch, maps=lam > 0, create_graph=True)
        bsz = query.shape[0]
        retrieval = composed_info_nce(query, target, self.scale())
        loss = retrieval
        if maps is not None:
            attn = attention_loss(maps, batch["mask"], self.hparams.attn_loss)
            loss = loss + lam * attn
            self.log("train/attention_loss", attn, batch_size=bsz)
        self.log("train/retrieval_loss", retrieval, batch_size=bsz)
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # as open_clip: keep the temperature within [1, 100]
            self.backbone.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.backbone, hp.weight_decay)
        for g in param_groups(self.combiner, hp.weight_decay):
            g["lr"] = hp.combiner_lr or hp.lr
            groups.append(g)
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        trainer = self.trainer

        def total() -> int:  # asked lazily, see ContrastiveModule.configure_optimizers
            return max(1, int(trainer.estimated_stepping_batches))

        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------- eval
    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        with_maps = bool(self.hparams.eval_maps) and batch.get("mask") is not None
        with torch.no_grad():
            if with_maps:
                with torch.enable_grad():  # the maps are gradients; nothing else needs a graph
                    query, target, reference, maps = self.forward_batch(batch, maps=True, create_graph=False)
                query, target, reference = query.detach(), target.detach(), reference.detach()
                self.grounding[stage].update(maps, batch["mask"] > 0.5)
            else:
                query, target, reference, maps = self.forward_batch(batch, maps=False, create_graph=False)
        self._store.setdefault(stage, []).append(
            {
                "index": batch["index"],
                "query": query,
                "target": target,
                "reference": reference,
                "target_key": batch["target_key"],
                "reference_key": batch["reference_key"],
            }
        )
        return {
            "reference": batch["reference"],
            "target": batch["target"],
            "maps": maps,
            "mask": batch.get("mask"),
            "modifier": batch["modifier"],
            "image_ids": batch["image_ids"],
        }

    def _eval_epoch_end(self, stage: str) -> None:
        rows = self._store.pop(stage, [])
        if rows:
            local = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        else:  # a rank without samples still takes part in the gathers
            d = self.backbone.embed_dim
            local = {k: torch.zeros(0, d, device=self.device) for k in ("query", "target", "reference")}
            local.update({k: torch.zeros(0, dtype=torch.long, device=self.device) for k in ("index", "target_key")})
            local["reference_key"] = torch.zeros(0, dtype=torch.long, device=self.device)
        # a fixed key order: gather_rows is a collective, so every rank must gather the same key at the same time
        order = ("index", "query", "target", "reference", "target_key", "reference_key")
        every = {k: gather_rows(local[k]) for k in order}  # all ranks compute the same numbers
        if len(every["index"]):
            q = len(every["index"])
            keys, embs = every["target_key"], every["target"]
            if self.hparams.gallery == "targets_and_references":
                keys = torch.cat([keys, every["reference_key"]])
                embs = torch.cat([embs, every["reference"]])
            gallery, target, exclude = build_gallery(keys, embs, every["target_key"], every["reference_key"])
            recalls = recall_at_k(every["query"] @ gallery.T, target, self.hparams.recall_k, exclude)
            for name, value in recalls.items():
                self.log(f"{stage}/{name}", value.float(), sync_dist=False, rank_zero_only=False)
            self.log(f"{stage}/gallery_size", float(len(gallery)), sync_dist=False)
            self.log(f"{stage}/queries", float(q), sync_dist=False)
        metric = self.grounding[stage]
        # every rank must take the same branch: compute() is a collective
        updated = gather_rows(torch.tensor([metric.update_count], device=self.device)).sum() > 0
        if bool(updated):
            for name, value in metric.compute().items():
                self.log(f"{stage}/{name}", value.float(), sync_dist=False)
        metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
