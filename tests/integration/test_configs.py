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
