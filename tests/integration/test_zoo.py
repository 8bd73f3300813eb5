"""`pretrained="regionembed:<name>"`: the shipped weights (sha256, architecture), re-training through the library."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from regionembed import zoo
from regionembed.backbones import OpenCLIPBackbone


def test_shipped_weights_match_sha256_and_architecture():
    entry = zoo.MODELS["clip_synthetic"]
    path = Path(zoo.resolve("clip_synthetic"))
    assert path == zoo.WEIGHTS_DIR / entry.weights and path.is_file()
    assert zoo.file_sha256(path) == entry.sha256
    assert path.stat().st_size < 8 * 2**20  # a few MB: the small vocabulary keeps the token embedding tiny
    state = load_file(str(path))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    model = open_clip.create_model(entry.model_name)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)  # every shape matches the architecture
    backbone = OpenCLIPBackbone(entry.model_name, pretrained="regionembed:clip_synthetic")
    assert torch.equal(backbone.model.visual.conv1.weight, state["visual.conv1.weight"].float())


def test_shipped_config_is_the_repository_training_config():
    repo_config = Path(__file__).resolve().parents[2] / "configs" / "train" / "clip_synthetic.yaml"
    if not repo_config.exists():
        pytest.skip("not a repository checkout")
    assert repo_config.read_bytes() == zoo.MODELS["clip_synthetic"].path("config").read_bytes()


def test_zoo_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown regionembed model"):
        zoo.resolve("nope")
    with pytest.raises(ValueError, match="is a re-synth-vit model"):
        OpenCLIPBackbone("re-tiny-vit", pretrained="regionembed:clip_synthetic")
    entry = zoo.MODELS["clip_synthetic"]
    monkeypatch.setitem(zoo.MODELS, "edited", zoo.ZooEntry(entry.model_name, entry.weights, "0" * 64, entry.config))
    with pytest.raises(RuntimeError, match="is not the shipped one"):
        zoo.resolve("edited")
    missing = zoo.ZooEntry(entry.model_name, str(tmp_path / "gone.safetensors"), "0" * 64, entry.config)
    monkeypatch.setitem(zoo.MODELS, "missing", missing)
    with pytest.raises(FileNotFoundError, match="retrain missing"):
        zoo.resolve("missing")


def test_retrain_through_the_library_keeps_only_what_resuming_needs(tmp_path, monkeypatch, caplog):
    config = Path(__file__).resolve().parents[2] / "configs" / "tests" / "tiny_clip.yaml"
    monkeypatch.setitem(zoo.MODELS, "tiny_test", zoo.ZooEntry("re-tiny-vit", "none.safetensors", "0" * 64, str(config)))
    caplog.set_level("WARNING")
    out = tmp_path / "zoo"
    overrides = [
        "--trainer.max_steps=6",
        "--trainer.callbacks.init_args.every_s=0",
        "--model.init_args.multi_positive=true",
    ]
    weights = zoo.retrain("tiny_test", out, [*overrides, "--model.init_args.export_dtype=float16"])
    assert weights == out / "tiny_test.safetensors" and weights.is_file()
    assert not (out / "tiny_test_run" / "checkpoints").exists()  # deleted once exported
    assert any("left at this machine's current speed" in r.getMessage() for r in caplog.records)
    assert all(v.dtype == torch.float16 for v in load_file(str(weights)).values() if v.is_floating_point())
    backbone = OpenCLIPBackbone("re-tiny-vit", pretrained=str(weights))
    assert backbone.embed_dim > 0
    stacked = (out / "tiny_test_run" / "train_overrides.yaml").read_text()
    assert "save_top_k: 0" in stacked and str(out) in stacked


def test_retrain_keeps_one_checkpoint_and_resumes(tmp_path, monkeypatch):
    config = Path(__file__).resolve().parents[2] / "configs" / "tests" / "tiny_clip.yaml"
    monkeypatch.setitem(zoo.MODELS, "tiny_test", zoo.ZooEntry("re-tiny-vit", "none.safetensors", "0" * 64, str(config)))
    out = tmp_path / "zoo"
    ckpts = out / "tiny_test_run" / "checkpoints"
    monkeypatch.setattr(zoo.shutil, "rmtree", lambda *a, **k: None)  # keep them to look at
    zoo.retrain("tiny_test", out, ["--trainer.max_steps=4"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    step = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    zoo.retrain("tiny_test", out, ["--trainer.max_steps=8"])  # resumes from last.ckpt: 4 more steps, not 8
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] > step
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_verify_prints_sha256_and_probe(capsys):
    zoo.main(["verify", "clip_synthetic"])
    report = json.loads(capsys.readouterr().out)
    assert report["shipped"]["sha256"] == zoo.MODELS["clip_synthetic"].sha256
    assert set(report["shipped"]["probe"]["templates"]["a {}."]) == {"model", "mean_tokens"}
