"""Tiny Hugging Face CLIP and SigLIP folders built offline (random weights, a word-level tokenizer of a few words)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "photo", "of", "the", "cat", "dog", "red", "blue", "square", "circle"]
PAD, UNK, BOS, EOS = 0, 1, 2, 3
WIDTH, LAYERS, HEADS, PATCH, SIZE, CONTEXT = 32, 3, 2, 8, 32, 16


def tiny_tokenizer(context: int = CONTEXT):
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` that wraps texts in ``<bos> ... <eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=context,
    )


def _towers(**vision) -> dict:
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        max_position_embeddings=CONTEXT,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    vision_cfg = dict(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
    )
    vision_cfg.update(vision)
    return {"text_config": text, "vision_config": vision_cfg}


def save_tiny(folder: Path, family: str, seed: int = 0, **vision) -> torch.nn.Module:
    """Write a tiny random ``CLIPModel`` (``family="clip"``) or ``SiglipModel`` (``"siglip"``) with its image
    processor and tokenizer to ``folder`` with ``save_pretrained``; returns the model (eval mode)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(CLIPConfig(projection_dim=24, **_towers(hidden_act="quick_gelu", **vision)))
        processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(**_towers(**vision)))
        processor = SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=2)
    else:
        raise ValueError(family)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model
