"""Tiny Hugging Face tokenizers built locally (no hub): stand-ins for SigLIP's hub tokenizers in tests."""

from __future__ import annotations

from pathlib import Path

WORDS = tuple(
    [
        "a",
        "an",
        "the",
        "photo",
        "of",
        "cat",
        "dog",
        "car",
        "red",
        "blue",
        "green",
        "square",
        "circle",
        "in",
        "on",
        "and",
        "with",
        "picture",
        "small",
        "big",
    ]
)


def tiny_hf_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = WORDS) -> Path:
    """Save a word-level tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``words``) with ``save_pretrained``.

    It pads with ``<pad>`` and appends ``</s>`` like SigLIP's; ``AutoTokenizer.from_pretrained(folder)`` loads it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder = Path(folder)
    fast.save_pretrained(folder)
    return folder
