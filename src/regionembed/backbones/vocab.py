"""Small text vocabularies: open_clip's BPE tokenizer followed by a lookup into a few hundred embedding rows.

A CLIP trained only on the synthetic world's sentences uses a few dozen of the 49,408 BPE tokens, yet a full token
embedding would be most of its weights (49,408 x width). A *remapped* model keeps open_clip's tokenizer (so any
prompt a user types still tokenises) and looks every id up in a table built from a word list shipped beside the
architecture (``model_configs/<name>.vocab.txt``, one word or phrase a line):

- ``0`` (padding) stays ``0``;
- every BPE token of the word list gets its own row ``2..K+1``, in increasing BPE-id order;
- any other token maps to ``1`` (unknown): a prompt with words the model never saw degrades to "a <unk>." instead of
  failing or colliding with a trained word (a hashed embedding would silently alias "dog" with, say, "red");
- start and end of text get the last two rows, so the end token keeps the largest id and open_clip's ``argmax``
  text pooling still finds it.

The model config's ``text_cfg.vocab_size`` must equal ``K + 4``; the backbone checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["UNKNOWN_ID", "RemappedTokenizer", "read_words", "vocabulary_file"]

UNKNOWN_ID = 1
VOCAB_SUFFIX = ".vocab.txt"


def vocabulary_file(model_name: str, config_dir: Path) -> Path | None:
    """``<config_dir>/<model_name>.vocab.txt`` when the architecture has a small vocabulary, else None."""
    path = config_dir / f"{model_name}{VOCAB_SUFFIX}"
    return path if path.is_file() else None


def read_words(path: Path) -> list[str]:
    """Non-empty lines of a vocabulary file, stripped; ``#`` starts a comment line."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    words = [line for line in lines if line and not line.startswith("#")]
    if not words:
        raise ValueError(f"vocabulary file {path} lists no words")
    return words


class RemappedTokenizer:
    """An open_clip tokenizer whose ids are remapped into a small vocabulary (see the module docstring).

    Args:
        base: an open_clip ``SimpleTokenizer`` (``sot_token_id``, ``eot_token_id``, ``vocab_size``, callable).
        words: the words and phrases whose BPE tokens get their own embedding rows.
    """

    def __init__(self, base, words: Sequence[str]) -> None:
        self.base = base
        ids = torch.unique(base(list(words))).tolist()
        special = {0, int(base.sot_token_id), int(base.eot_token_id)}
        known = [i for i in ids if i not in special]
        table = torch.full((int(base.vocab_size),), UNKNOWN_ID, dtype=torch.long)
        table[0] = 0
        table[torch.tensor(known, dtype=torch.long)] = torch.arange(2, 2 + len(known))
        self.vocab_size = len(known) + 4
        table[int(base.sot_token_id)] = self.vocab_size - 2
        table[int(base.eot_token_id)] = self.vocab_size - 1
        self.table = table
        self.context_length = base.context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[N, context_length]`` ids in ``[0, vocab_size)``."""
        return self.table[self.base(texts, context_length=context_length)]

    def unknown_words(self, texts: Sequence[str]) -> list[str]:
        """The words of ``texts`` that contain a token outside the vocabulary (map to the unknown row)."""
        words = sorted({w for t in texts for w in t.replace(".", " ").replace(",", " ").split()})
        return [w for w in words if bool((self([w]) == UNKNOWN_ID).any())]
