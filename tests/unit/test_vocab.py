"""Small remapped vocabularies (re-synth-vit): open_clip ids still work, unknown words are safe."""

import json

import open_clip
import pytest
import torch

from regionembed.backbones import OpenCLIPBackbone
from regionembed.backbones.open_clip import MODEL_CONFIG_DIR, get_tokenizer
from regionembed.backbones.vocab import UNKNOWN_ID, RemappedTokenizer, read_words
from regionembed.data import SyntheticWorld, WorldConfig


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("re-synth-vit")


def test_vocab_size_matches_the_model_config(tokenizer):
    cfg = json.loads((MODEL_CONFIG_DIR / "re-synth-vit.json").read_text())
    assert isinstance(tokenizer, RemappedTokenizer)
    assert tokenizer.vocab_size == cfg["text_cfg"]["vocab_size"]


def test_special_ids_keep_their_roles(tokenizer):
    ids = tokenizer(["a red circle.", ""])
    assert int(ids.max()) == tokenizer.vocab_size - 1  # end of text stays the largest id: argmax pooling finds it
    assert int(ids[0, 0]) == tokenizer.vocab_size - 2  # start of text
    assert int(ids[1, 2:].max()) == 0  # padding stays 0
    eot_position = ids.argmax(dim=-1)
    base = open_clip.get_tokenizer("re-synth-vit")(["a red circle.", ""])
    assert torch.equal(eot_position, base.argmax(dim=-1))  # open_clip pools the same position as unmapped


def test_every_synthetic_world_word_is_known(tokenizer):
    world = SyntheticWorld(WorldConfig(), seed=123)  # another seed than training: other scenes, same language
    texts = [f"a {n}." for n in world.class_names] + [f"a photo of a {n}." for n in world.class_names]
    for i in range(300):
        scene = world.scene(i)
        texts.append(scene.caption)
        texts += [r.text for r in world.referring_expressions(scene, ambiguous_only=False)]
        texts.append(world.triplet(i).modifier)
    assert tokenizer.unknown_words(texts) == []
    assert not bool((tokenizer(texts) == UNKNOWN_ID).any())


def test_unknown_words_map_to_one_row_and_encode(tokenizer):
    ids = tokenizer(["a dog", "a giraffe"])
    assert int(ids[0, 2]) == UNKNOWN_ID and int(ids[1, 2]) == UNKNOWN_ID
    assert tokenizer.unknown_words(["a red dog"]) == ["dog"]
    backbone = OpenCLIPBackbone("re-synth-vit")
    out = backbone.encode_text(backbone.tokenize(["a photo of a dog on the beach", "a red circle."]))
    assert out.shape == (2, backbone.embed_dim) and torch.isfinite(out).all()


def test_vocabulary_and_model_disagree(tmp_path):
    words = read_words(MODEL_CONFIG_DIR / "re-synth-vit.vocab.txt")
    small = RemappedTokenizer(open_clip.get_tokenizer("re-synth-vit"), words[:5])
    assert small.vocab_size < 10
    model = open_clip.create_model("re-synth-vit")
    assert model.token_embedding.num_embeddings == get_tokenizer("re-synth-vit", model).vocab_size
    model.token_embedding = torch.nn.Embedding(7, model.token_embedding.embedding_dim)
    with pytest.raises(ValueError, match="vocab_size"):
        get_tokenizer("re-synth-vit", model)
    empty = tmp_path / "x.vocab.txt"
    empty.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="lists no words"):
        read_words(empty)
