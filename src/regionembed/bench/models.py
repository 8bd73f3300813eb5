"""Which open_clip configs regionembed handles, and how: ``python -m regionembed.bench models``.

Every config in ``open_clip.list_models()`` whose image tower belongs to a family of issue 14 (SigLIP/SigLIP2,
EVA02, PE-Core, CoCa; EVA01 shares EVA02's timm ``Eva`` tower and is listed too) is chosen by its *tower* (the
config's ``timm_model_name`` or CoCa's ``multimodal_cfg``), not by its name, and built with random weights on the
meta device (no memory for the weights: a 4B-parameter EVA02-E-14 builds in about a second), through
``OpenCLIPBackbone`` as a user builds it. The table says what the dispatch made of it: the adapter class, the token
grid at the preprocessing size, whether LeGrad explains an attention pool (and with which recipe), whether the
blocks fit the decomposed MaskInversion formulas (``block_parts``) and what MaskInversion's ``auto`` runs, with the
reason it logs. A config that cannot be built says why (the error's type and message).

    python -m regionembed.bench models                     # every config of these families
    python -m regionembed.bench models --models EVA02-E-14 ViT-SO400M-14-SigLIP2 --json

``tests/unit/test_model_families.py`` runs the same code (and a forward and a LeGrad backward on meta tensors).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where used: listing the configs needs neither
    from ..backbones import OpenCLIPBackbone
    from ..inversion import MaskInversion

__all__ = ["FAMILIES", "ModelSupport", "build_on_meta", "family_models", "support_row", "tower_family"]

#: families in the order of the table: (name, what selects it)
FAMILIES = {
    "SigLIP": "timm tower vit_*_siglip_* (SigLIP and SigLIP2 share it; NLLB-CLIP's too)",
    "EVA02": "timm tower eva02_* (timm Eva: rotary embeddings, SwiGLU)",
    "EVA01": "timm tower eva_* (timm Eva, as EVA02's)",
    "PE-Core": "timm tower vit_pe_core_* (timm Eva with AttentionRope and a map head)",
    "CoCa": "multimodal_cfg (open_clip's CoCa model; its image tower is open_clip's VisionTransformer)",
}

_TOWER_PATTERNS = (  # timm model name -> family; the first match wins
    ("SigLIP", re.compile(r"^vit_.*_siglip_")),
    ("EVA02", re.compile(r"^eva02_")),
    ("EVA01", re.compile(r"^eva_")),
    ("PE-Core", re.compile(r"^vit_pe_core_")),
)


def tower_family(model_name: str) -> str | None:
    """The family of ``model_name``'s image tower (a key of :data:`FAMILIES`), read from its open_clip config;
    ``None`` for other towers (OpenAI-style ViTs, ResNets, ConvNeXt, ...)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) or {}
    if "multimodal_cfg" in cfg:  # open_clip's factory builds CoCa exactly when the config has one
        return "CoCa"
    timm_name = cfg.get("vision_cfg", {}).get("timm_model_name") or ""
    for family, pattern in _TOWER_PATTERNS:
        if pattern.search(timm_name):
            return family
    return None


def family_models() -> list[str]:
    """open_clip's own configs (regionembed's tiny ones left out) of the :data:`FAMILIES`, in the order of
    ``open_clip.list_models()``."""
    import open_clip

    from ..backbones.open_clip import TINY_MODELS

    return [m for m in open_clip.list_models() if m not in TINY_MODELS and tower_family(m) is not None]


def _uses_hf_tokenizer(model_name: str) -> bool:
    import open_clip

    return bool((open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name"))


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs a WARNING per random-init build on the root logger; the table says so once."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def build_on_meta(model_name: str, tokenizer: str | bool | None = False):
    """``OpenCLIPBackbone(model_name, tokenizer=tokenizer)`` with random weights on the meta device.

    Args:
        model_name: an open_clip config name.
        tokenizer: as ``OpenCLIPBackbone``'s; ``False`` (default) builds no tokenizer. For configs with a Hugging
            Face tokenizer, a local tokenizer folder builds the text side too.

    Returns:
        The adapter ``OpenCLIPBackbone`` dispatched to, every parameter and buffer a meta tensor.
    """
    from ..backbones import OpenCLIPBackbone

    with _quiet_open_clip(), torch.device("meta"):
        return OpenCLIPBackbone(model_name, tokenizer=tokenizer if _uses_hf_tokenizer(model_name) else None)


@dataclass
class ModelSupport:
    """One row of the table: what the dispatch made of an open_clip config.

    Attributes:
        model: the open_clip config name.
        family: its tower family (:func:`tower_family`).
        adapter: the class ``OpenCLIPBackbone`` returned (``None`` when the build failed).
        image_size: the input side of the preprocessing config.
        patch_size: the tower's patch size.
        grid: the token grid ``(h, w)`` at ``image_size``.
        prefix_tokens: [CLS] and register tokens before the patch tokens.
        blocks: number of transformer blocks.
        embed_dim: the embedding size ``D``.
        attention_pool: whether LeGrad explains an attention-pool head (``uses_attention_pool``).
        legrad_recipe: the attention-pool recipe (``"siglip"``, ``"coca"``), ``None`` without a pool.
        block_parts_fit: whether every block fits the decomposed MaskInversion formulas (``block_parts``).
        auto: the strategy MaskInversion's ``auto`` runs with LeGrad's default layers.
        auto_reason: why, in the solver's words (what ``auto`` logs when it falls back).
        error: ``"Type: message"`` when the build or a check failed.
    """

    model: str
    family: str | None
    adapter: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None
    blocks: int | None = None
    embed_dim: int | None = None
    attention_pool: bool | None = None
    legrad_recipe: str | None = None
    block_parts_fit: bool | None = None
    auto: str | None = None
    auto_reason: str | None = None
    error: str | None = None


def support_row(
    model_name: str, backbone: OpenCLIPBackbone | None = None, solver: MaskInversion | None = None
) -> ModelSupport:
    """What the dispatch made of ``model_name``: built on meta (:func:`build_on_meta`) unless ``backbone`` is given.

    ``auto`` and ``auto_reason`` are what ``solver`` (default: ``MaskInversion()``, LeGrad on the last block, the
    default ``memory_budget_mb``) plans for one mask at the preprocessing size, and the reason the solver gives
    (:meth:`~regionembed.inversion.MaskInversion.plan_with_reason`). A failed build is a row with ``error`` set, not
    an exception: the table lists every config.
    """
    from ..backbones.base import TokenGridBackbone, uses_attention_pool
    from ..inversion import MaskInversion

    row = ModelSupport(model_name, tower_family(model_name))
    try:
        b = backbone if backbone is not None else build_on_meta(model_name)
    except Exception as err:  # the row reports any failure, whatever its type
        row.error = f"{type(err).__name__}: {err}"
        return row
    row.adapter = type(b).__name__
    row.image_size, row.patch_size, row.embed_dim = b.preprocess.size, b.patch_size, b.embed_dim
    row.grid = b.grid_size(b.preprocess.size)
    if isinstance(b, TokenGridBackbone):
        row.prefix_tokens, row.blocks = b.num_prefix_tokens, len(b.blocks)
        row.block_parts_fit = all(b.block_parts(blk) is not None for blk in b.blocks)
    row.attention_pool = uses_attention_pool(b)
    row.legrad_recipe = b.legrad_recipe if row.attention_pool else None
    solver = MaskInversion() if solver is None else solver
    row.auto, row.auto_reason = solver.plan_with_reason(b, b.preprocess.size, 1)
    return row


def markdown_table(rows: list[ModelSupport]) -> str:
    head = "| config | family | adapter | image / patch / grid | attention pool (recipe) | `block_parts` | `auto` |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.model} | {r.family} | refused: {r.error.split(':')[0]} (below) |  |  |  |  |")
            continue
        pool = f"yes ({r.legrad_recipe})" if r.attention_pool else "no"
        geometry = f"{r.image_size} / {r.patch_size} / {r.grid[0]}x{r.grid[1]}"
        fits = "fits" if r.block_parts_fit else "`None`"
        lines.append(f"| {r.model} | {r.family} | {r.adapter} | {geometry} | {pool} | {fits} | {r.auto} |")
    return "\n".join(lines)


def summary(rows: list[ModelSupport]) -> str:
    """Counts per family and adapter, the refusals in full, and the reasons ``auto`` gives for ``naive``."""
    lines = []
    for family in FAMILIES:
        mine = [r for r in rows if r.family == family]
        if not mine:
            continue
        built = [r for r in mine if r.error is None]
        kinds = sorted({f"{r.adapter} -> auto={r.auto}" for r in built})
        lines.append(f"- {family}: {len(mine)} configs, {len(built)} built ({'; '.join(kinds)})")
    for r in rows:
        if r.error is not None:
            lines.append(f"- {r.model} refused: {r.error}")
    for reason in sorted({r.auto_reason for r in rows if r.auto == "naive"}):
        models = [r.model for r in rows if r.auto == "naive" and r.auto_reason == reason]
        lines.append(f"- `auto` = naive for {', '.join(models)}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m regionembed.bench models", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="open_clip config names (default: every config of the families)"
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON record per config")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail at once where something would
    models = args.models or family_models()
    rows = [support_row(m) for m in models]
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
    print(markdown_table(rows))
    print()
    print(summary(rows))
