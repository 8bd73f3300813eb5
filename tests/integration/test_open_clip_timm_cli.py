"""infer.py with open_clip's timm towers: region classification end to end on tiny SigLIP and EVA02 configs."""

from pathlib import Path

import pytest

from helpers.tokenizers import tiny_hf_tokenizer
from regionembed.backbones import OpenCLIPTimmBackbone
from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tests" / "tiny_region_cls.yaml"


@pytest.mark.parametrize("model_name", ["re-tiny-siglip", "re-tiny-eva02"])
def test_region_classification_on_timm_towers(tmp_path, model_name):
    # the class users name is OpenCLIPBackbone; it builds the timm adapter for these configs
    backbone = ["--model.init_args.backbone.class_path=regionembed.backbones.OpenCLIPBackbone"]
    backbone.append(f"--model.init_args.backbone.init_args.model_name={model_name}")
    if "siglip" in model_name:
        tokenizer = tiny_hf_tokenizer(tmp_path / "tokenizer")
        backbone.append(f"--model.init_args.backbone.init_args.tokenizer={tokenizer}")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        cli = infer_main(
            [
                "test",
                f"--config={CONFIG}",
                *backbone,
                f"--model.init_args.results_path={tmp_path / 'r.json'}",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert isinstance(cli.model.backbone, OpenCLIPTimmBackbone)
    assert cli.model.backbone.model_name == model_name
    results = cli.model.results
    assert {"global", "mask_pool", "mask_inversion"} <= set(results)
    for row in results.values():
        assert 0 <= row["top1"] <= row["top5"] <= 1


def test_siglip_fragment_parses(capsys):
    """The shipped SigLIP backbone fragment stacks on an infer config (``--print_config``: nothing is built or
    downloaded)."""
    with pytest.raises(SystemExit) as exit_info:
        infer_main(
            [
                "test",
                f"--config={CONFIG}",
                f"--model.init_args.backbone={ROOT / 'configs' / 'backbone' / 'siglip_b16.yaml'}",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "regionembed.backbones.OpenCLIPBackbone" in out and "model_name: ViT-B-16-SigLIP" in out
    assert "tokenizer: null" in out
