"""infer.py with a Hugging Face SigLIP folder as the backbone (a YAML fragment, as a user would stack it)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")

from helpers.hf_models import save_tiny
from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "infer" / "maskinversion.yaml")


def test_predict_with_an_hf_siglip_folder(region_folder, tmp_path):
    save_tiny(tmp_path / "siglip", "siglip")
    fragment = tmp_path / "hf.yaml"
    fragment.write_text(
        "model:\n  init_args:\n    backbone:\n      class_path: regionembed.backbones.HFBackbone\n"
        f"      init_args:\n        path_or_name: {tmp_path / 'siglip'}\n"
    )
    out = tmp_path / "out"
    infer_main(
        [
            "predict",
            f"--config={CONFIG}",
            f"--config={fragment}",
            f"--data.root={region_folder}",
            f"--writer.output_dir={out}",
            "--model.init_args.solver.init_args.iterations=2",
            "--model.init_args.solver.init_args.explainer.init_args.layers=[0, 1, 2]",
            "--trainer.enable_progress_bar=false",
        ]
    )
    manifest = json.loads((out / "a" / "manifest.json").read_text())
    assert [r["name"] for r in manifest["regions"]] == ["grey", "rgba", "zero_one"]
    with safe_open(str(out / "a" / "embeddings.safetensors"), "pt") as f:
        emb = f.get_tensor("embeddings")
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()


def test_hub_name_offline_is_one_error_naming_the_folder_way(region_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fragment = tmp_path / "hf.yaml"
    fragment.write_text(
        "model:\n  init_args:\n    backbone:\n      class_path: regionembed.backbones.HFBackbone\n"
        "      init_args:\n        path_or_name: google/siglip-base-patch16-224\n"
    )
    with pytest.raises(SystemExit) as info:
        infer_main(
            [
                "predict",
                f"--config={CONFIG}",
                f"--config={fragment}",
                f"--data.root={region_folder}",
                f"--writer.output_dir={tmp_path / 'out'}",
            ]
        )
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "HFBackbone('/path/to/folder')" in err and "init_args.pretrained" not in err
