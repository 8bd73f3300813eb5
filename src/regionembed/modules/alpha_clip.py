"""Alpha-CLIP-style fine-tuning (Sun et al., 2023): (image, region mask as alpha, region text), text tower frozen."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from ..backbones.alpha import alpha_from_masks, export_alpha_clip_visual, whole_image_alpha
from ..backbones.base import Backbone
from ..losses import gather_features, masked_contrastive_loss
from ..metrics import RegionAccuracy
from ..text import TextEmbeddingCache
from .contrastive import ContrastiveModule, check_optimizer_settings, param_groups

# masked_contrastive_loss lives in regionembed.losses; it stays importable from here (its first home)
__all__ = ["AlphaCLIPModule", "alpha_pairs", "masked_contrastive_loss"]

log = logging.getLogger(__name__)


def _text_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))  # stable across processes (unlike hash())


def alpha_pairs(
    batch: dict[str, Any],
    generator: torch.Generator,
    regions_per_image: int = 1,
    whole_image_ratio: float = 0.1,
    templates: Sequence[str] = ("a photo of a {}.",),
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(image, alpha, text) training pairs from a batch of the shared region data modules.

    Each image gives ``regions_per_image`` pairs: a region drawn at random (alpha = its mask, text = its name
    filled into a random template) or, with probability ``whole_image_ratio`` and whenever the image has no region
    left to draw, the whole image (alpha = 1 everywhere, text = the image's ``caption`` when the batch has one,
    else its region names joined). Referring batches (RefCOCO: per-image ``text`` and ``target_index``) offer only
    the referred region, with the expression as its text.

    Returns:
        ``images`` ``[P, 3, S, S]``, normalised ``alphas`` ``[P, 1, S, S]`` and ``P`` texts,
        ``P = B * regions_per_image`` (equal on every rank, as gathering needs).
    """
    images, masks, texts = batch["image"], batch["masks"], batch["texts"]
    index = batch["region_batch_index"].cpu()
    size = tuple(images.shape[-2:])
    captions = batch.get("caption")
    out_images, out_alpha, out_texts = [], [], []
    whole = whole_image_alpha(1, size, device=images.device)[0]
    referring = "target_index" in batch and "text" in batch
    for b in range(images.shape[0]):
        regions = torch.nonzero(index == b).flatten()
        if referring:
            target = int(batch["target_index"][b])
            names = {int(regions[target]): batch["text"][b]} if 0 <= target < len(regions) else {}
        else:
            names = {int(r): texts[r] for r in regions.tolist()}
        candidates = list(names)
        order = [candidates[i] for i in torch.randperm(len(candidates), generator=generator).tolist()]
        for _ in range(regions_per_image):
            use_whole = not order or float(torch.rand((), generator=generator)) < whole_image_ratio
            if use_whole:
                if captions is not None and captions[b]:
                    text = str(captions[b])
                else:
                    every = [texts[r] for r in regions.tolist()]
                    text = templates[0].format(" and ".join(every)) if every else "a photo."
                alpha = whole
            else:
                r = order.pop()
                template = templates[int(torch.randint(len(templates), (), generator=generator))]
                text = template.format(names[r])
                alpha = alpha_from_masks(masks[r : r + 1])[0]
            out_images.append(images[b])
            out_alpha.append(alpha)
            out_texts.append(text)
    return torch.stack(out_images), torch.stack(out_alpha), out_texts


class AlphaCLIPModule(ContrastiveModule):
    """Fine-tune an image tower with an alpha channel on (image, region mask, region text); text tower frozen.

    Batches come from the shared region data modules (synthetic world, COCO instances, RefCOCO refs); see
    :func:`alpha_pairs` for how pairs are drawn. The draw is seeded by ``(seed, global step, rank)``, so a
    resumed run continues with the same pairs.

    Logged: ``train/loss``, ``train/logit_scale``, ``val/loss``, ``val/region_top1``, ``val/region_top5``
    (validation regions classified with alpha = mask against the class prompts, when the data has classes).

    Args:
        backbone: an open_clip backbone; its alpha channel is enabled here if it has none.
        lr_alpha: learning rate of the alpha conv (Alpha-CLIP: 2e-4).
        lr: learning rate of the rest of the image tower (Alpha-CLIP: 2e-6).
        weight_decay: AdamW weight decay (not on biases, norms, embeddings' gains or the temperature).
        warmup_steps: linear warmup before the cosine decay.
        betas: AdamW betas.
        label_smoothing: label smoothing of the contrastive targets.
        learn_temperature: train the logit scale (else it stays fixed at the backbone's value).
        whole_image_ratio: share of pairs that are the whole image with alpha = 1 (Alpha-CLIP: 10%).
        regions_per_image: pairs drawn per image per step.
        templates: prompt templates for region texts (``["{}"]`` for referring expressions).
        mask_duplicate_texts: leave pairs with identical texts out of each other's negatives.
        seed: seed of the pair draw.
        export_path: write the fine-tuned visual tower and alpha conv there at the end of fit, in the official
            Alpha-CLIP key format (``.safetensors`` or ``.pth``), loadable with
            ``OpenCLIPBackbone(..., alpha_checkpoint=export_path)``.
    """

    def __init__(
        self,
        backbone: Backbone,
        lr_alpha: float = 2e-4,
        lr: float = 2e-6,
        weight_decay: float = 0.02,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.98),
        label_smoothing: float = 0.0,
        learn_temperature: bool = False,
        whole_image_ratio: float = 0.1,
        regions_per_image: int = 1,
        templates: list[str] | None = None,
        mask_duplicate_texts: bool = True,
        seed: int = 0,
        export_path: str | None = None,
    ) -> None:
        check_optimizer_settings(lr_alpha=lr_alpha)
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, betas=betas)
        self.save_hyperparameters(ignore=["backbone"])
        if not 0.0 <= whole_image_ratio <= 1.0:
            raise ValueError(f"whole_image_ratio must be in [0, 1], got {whole_image_ratio}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if regions_per_image < 1:
            raise ValueError(f"regions_per_image must be >= 1, got {regions_per_image}")
        self.templates = list(templates or ["a photo of a {}."])
        if any("{}" not in t for t in self.templates):
            raise ValueError(f"every template needs a '{{}}' placeholder, got {self.templates}")
        backbone.enable_alpha()
        backbone.set_trainable(image=True, logit_scale=learn_temperature, alpha=True)
        self.text_cache = TextEmbeddingCache(max_size=200_000)  # the frozen text tower, texts as they come
        self.class_cache = TextEmbeddingCache(self.templates)
        self.world, self.rank = 1, 0  # set in setup() once a trainer is attached
        self.class_names: list[str] = []
        self.val_accuracy: RegionAccuracy | None = None

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        self.world = self.trainer.world_size if self._trainer is not None else 1
        self.rank = self.trainer.global_rank if self._trainer is not None else 0
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        try:
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
        except RuntimeError:  # known only after the data module's setup
            self.class_names = []
        if self.class_names:
            self.val_accuracy = RegionAccuracy(num_classes=len(self.class_names), top_k=(1, 5))

    def on_fit_start(self) -> None:
        self.backbone.train()
        self._text_tower_eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._text_tower_eval()
        return self

    def _text_tower_eval(self) -> None:
        """The frozen text tower stays in eval mode (no dropout), so cached text embeddings stay valid."""
        self.backbone.eval_text_tower()

    # ------------------------------------------------------------------------------------------ encoders
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings ``[N, D]`` of the frozen text tower, cached per distinct text."""
        return self.text_cache(self.backbone, texts, self.device)

    def _generator(self, stage: int) -> torch.Generator:
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 101 + self.rank * 7 + stage) % 2**63
        return torch.Generator().manual_seed(seed)

    def _pairs(self, batch: dict[str, Any], generator: torch.Generator):
        hp = self.hparams
        return alpha_pairs(batch, generator, hp.regions_per_image, hp.whole_image_ratio, self.templates)

    def _loss(self, images: torch.Tensor, alphas: torch.Tensor, texts: list[str]) -> torch.Tensor:
        image = self.backbone.encode_image(images, normalize=True, alpha=alphas)
        text = self.encode_texts(texts)
        ids = torch.tensor([_text_id(t) for t in texts], device=self.device)
        if self.world > 1:  # open_clip's gathering: all features on every rank, local ones keep their gradient
            image, text = gather_features(image, text, gather_with_grad=True, rank=self.rank, world_size=self.world)
            ids = self.all_gather(ids).reshape(-1)
        logits = self.backbone.logit_scale.exp() * image @ text.T
        return masked_contrastive_loss(
            logits, ids if self.hparams.mask_duplicate_texts else None, self.hparams.label_smoothing
        )

    # -------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, alphas, texts = self._pairs(batch, self._generator(0))
        loss = self._loss(images, alphas, texts)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(texts))
        self.log("train/logit_scale", self.backbone.logit_scale.exp(), batch_size=len(texts))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # a fixed draw per batch: the validation loss is comparable across epochs
        generator = torch.Generator().manual_seed(self.hparams.seed + 7919 * batch_idx + self.rank)
        images, alphas, texts = self._pairs(batch, generator)
        world, self.world = self.world, 1  # validation batches may differ in size across ranks: no gathering
        try:
            loss = self._loss(images, alphas, texts)
        finally:
            self.world = world
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(texts))
        if self.val_accuracy is not None and len(batch["labels"]):
            class_text = self.class_cache(self.backbone, self.class_names, self.device)
            index = batch["region_batch_index"]
            alphas = alpha_from_masks(batch["masks"])
            feats = self.backbone.encode_image(batch["image"][index], normalize=True, alpha=alphas)
            self.val_accuracy.update(feats @ class_text.T, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy is None:
            return
        # compute() is a collective: every rank takes the same branch, whatever its own batches held
        count = torch.tensor([float(self.val_accuracy.update_count)], device=self.device)
        if self.world > 1:
            count = self.all_gather(count).sum()
        if count.sum() > 0:
            values = self.val_accuracy.compute()
            self.log("val/region_top1", values["top1"], prog_bar=True, rank_zero_only=True)
            self.log("val/region_top5", values["top5"], rank_zero_only=True)
        self.val_accuracy.reset()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.hparams.learn_temperature:
            super().on_train_batch_end(outputs, batch, batch_idx)

    # ------------------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The alpha conv at ``lr_alpha``; the rest of the image tower (and the temperature) at ``lr``."""
        hp = self.hparams
        alpha = [{**g, "lr": hp.lr_alpha} for g in param_groups(self.backbone.alpha_embed, hp.weight_decay)]
        visual = [{**g, "lr": hp.lr} for g in param_groups(self.backbone.image_tower, hp.weight_decay)]
        groups = alpha + visual
        if hp.learn_temperature:
            groups.append({"params": [self.backbone.logit_scale], "lr": hp.lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    @rank_zero_only
    def _export(self) -> None:
        path = export_alpha_clip_visual(self.backbone, Path(self.hparams.export_path))
        log.info("exported the Alpha-CLIP visual tower to %s", path)
