"""Every shipped config parses and validates (``--print_config``: no model is built, nothing is downloaded)."""

from pathlib import Path

import pytest
import yaml

from regionembed.cli import infer_main, train_main

ROOT = Path(__file__).resolve().parents[2]
#: modules evaluated by infer.py (inference mode off); every other module is trained by train.py
INFER_MODULES = {"RegionClassificationModule", "LocalizationModule", "MaskInversionModule", "ReferringModule"}
CONFIGS = sorted(p for d in ("train", "infer", "tests") for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_config_parses(config, capsys):
    module = yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)[-1]
    main, command = (infer_main, "test") if module in INFER_MODULES else (train_main, "fit")
    with pytest.raises(SystemExit) as exit_info:
        main([command, f"--config={config}", "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith(module)


def _print_config(main, args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def _flat(node, prefix: str = "") -> dict[str, object]:
    """``{dotted.key: leaf}`` of a nested dict/list (list items by index)."""
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        return {k: v for key, value in items for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def test_a_backbone_file_is_found_relative_to_the_config_naming_it(tmp_path, monkeypatch, capsys):
    """`backbone: ../fragments/x.yaml` in a config means next to that config, whatever the working directory."""
    (tmp_path / "fragments").mkdir()
    (tmp_path / "fragments" / "x.yaml").write_text(
        "class_path: regionembed.backbones.OpenCLIPBackbone\ninit_args: {model_name: re-small-vit, image_size: 48}\n"
    )
    config = tmp_path / "jobs" / "job.yaml"
    config.parent.mkdir()
    config.write_text((ROOT / "configs" / "tests" / "tiny_clip.yaml").read_text())
    text = config.read_text().replace("backbone: ../backbone/tiny.yaml", "backbone: ../fragments/x.yaml")
    assert text != config.read_text()
    config.write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    printed = _print_config(train_main, ["fit", f"--config={config}"], capsys)
    backbone = printed["model"]["init_args"]["backbone"]["init_args"]
    assert (backbone["model_name"], backbone["image_size"]) == ("re-small-vit", 48)

    # a later override reaches into the file's init_args; a missing file is an error naming it
    printed = _print_config(
        train_main, ["fit", f"--config={config}", "--model.init_args.backbone.init_args.image_size=32"], capsys
    )
    assert printed["model"]["init_args"]["backbone"]["init_args"]["image_size"] == 32
    config.write_text(text.replace("x.yaml", "missing.yaml"))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 2 and "../fragments/missing.yaml" in capsys.readouterr().err


def test_noattn_override_changes_only_lambda_and_the_output_folders(capsys):
    base = ROOT / "configs" / "train" / "gradattn_synthetic.yaml"
    override = ROOT / "configs" / "train" / "overrides" / "noattn.yaml"
    attn = _flat(_print_config(train_main, ["fit", f"--config={base}"], capsys))
    noattn = _flat(_print_config(train_main, ["fit", f"--config={base}", f"--config={override}"], capsys))
    assert attn.keys() == noattn.keys()
    changed = {k: (attn[k], noattn[k]) for k in attn if attn[k] != noattn[k]}
    folder = "outputs/gradattn_synthetic"
    assert changed == {
        "model.init_args.attn_weight": (1.0, 0.0),
        "trainer.default_root_dir": (folder, f"{folder}_noattn"),
        "trainer.logger.init_args.save_dir": (folder, f"{folder}_noattn"),
        "trainer.callbacks.1.init_args.dirpath": (f"{folder}/checkpoints", f"{folder}_noattn/checkpoints"),
    }


def test_shipped_names_are_the_repository_files(tmp_path, monkeypatch, capsys):
    """`--config regionembed:NAME` (with or without .yaml) is the repository's configs/NAME, from any directory."""
    from regionembed.config_files import list_configs

    assert list_configs() == sorted(p.relative_to(ROOT / "configs").as_posix() for p in ROOT.glob("configs/**/*.yaml"))
    monkeypatch.chdir(tmp_path)
    main_job = ROOT / "configs" / "infer" / "region_cls_synthetic.yaml"
    by_path = _print_config(infer_main, ["test", f"--config={main_job}"], capsys)
    by_name = _print_config(infer_main, ["test", "--config", "regionembed:infer/region_cls_synthetic"], capsys)
    assert by_name == by_path
