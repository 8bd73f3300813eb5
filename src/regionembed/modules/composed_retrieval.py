"""Composed image retrieval (reference image + modifier text -> target image) with a gradient-attention loss.

A configurable reconstruction of MMGrad (Udhayanan et al., 2023; see :mod:`regionembed.explainers.grad_attention`
for what is known and what is our choice). The query is the composition of the reference image's embedding and the
modifier's text embedding (:class:`~regionembed.composed.SumCombiner`, or :class:`~regionembed.composed.LearnedCombiner`
after CLIP4Cir); targets are image embeddings; the retrieval loss is InfoNCE of each query against the targets of the
whole (gathered) batch (:func:`~regionembed.losses.composed_info_nce`). With
``attn_weight > 0`` a second term pulls the gradient-attention map of the query-target score on the reference image
onto the changed region (``attn_loss``: Dice, BCE or energy outside the mask), trained end to end through the
second-order backward.

Evaluation: Recall@K (:class:`~regionembed.metrics.RecallAtK`) over a gallery of the split's target (and reference)
images (:func:`~regionembed.composed.build_gallery`), the query's own reference excluded, and the map's grounding
on the changed region (IoU, Dice, pointing game, energy pointing game) when the data has changed-region masks.

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
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..composed import LearnedCombiner, SumCombiner, build_combiner, build_gallery, gather_rows
from ..explainers.grad_attention import Pooling, grad_attention_maps
from ..losses import composed_info_nce
from ..losses.attention import AttentionLossKind, attention_loss
from ..metrics import MapMaskAgreement, RecallAtK
from .contrastive import check_optimizer_settings, cosine_with_warmup, param_groups

# the combiners, the gallery helpers and the loss live in regionembed.composed and regionembed.losses; they stay
# importable from here, their first home
__all__ = [
    "ComposedRetrievalModule",
    "LearnedCombiner",
    "SumCombiner",
    "build_gallery",
    "composed_info_nce",
    "gather_rows",
]

TOWERS = ("image", "text", "logit_scale")


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
        self.combiner: nn.Module = build_combiner(
            combiner, backbone.embed_dim, combiner_proj_dim, combiner_hidden_dim, combiner_dropout
        )
        towers = set(train_towers)
        backbone.set_trainable(image="image" in towers, text="text" in towers, logit_scale="logit_scale" in towers)
        self.grounding = nn.ModuleDict({s: MapMaskAgreement() for s in ("val", "test")})
        self.recall = nn.ModuleDict({s: RecallAtK(k=recall_k) for s in ("val", "test")})
        self._store: dict[str, list[dict[str, torch.Tensor]]] = {}

    # ------------------------------------------------------------------------------------------------ parts
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
        # The gallery (targets, and references) of every rank, deduplicated: all ranks hold the same gallery. Each
        # rank then ranks its own queries against it; RecallAtK sums the hits over ranks in compute().
        # A fixed key order: gather_rows is a collective, so every rank must gather the same key at the same time.
        order = ("index", "target", "reference", "target_key", "reference_key")
        every = {k: gather_rows(local[k]) for k in order}
        recall = self.recall[stage]
        if len(every["index"]):
            keys, embs = every["target_key"], every["target"]
            if self.hparams.gallery == "targets_and_references":
                keys = torch.cat([keys, every["reference_key"]])
                embs = torch.cat([embs, every["reference"]])
            gallery, target, exclude = build_gallery(keys, embs, local["target_key"], local["reference_key"])
            recall.update(local["query"] @ gallery.T, target, exclude)  # [0, G] on a rank without queries
            for name, value in recall.compute().items():  # a collective: every rank of a non-empty split
                self.log(f"{stage}/{name}", value.float(), sync_dist=False, rank_zero_only=False)
            self.log(f"{stage}/gallery_size", float(len(gallery)), sync_dist=False)
            self.log(f"{stage}/queries", float(len(every["index"])), sync_dist=False)
        recall.reset()
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
