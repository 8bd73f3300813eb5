"""What a first-time user meets on the command line: help, stacked configs, model shortcuts, one-line errors,
outputs that say where they went and never land in the working directory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regionembed import zoo
from regionembed.cli import CLIError, infer_main, single_args, train_main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "backbone" / "tiny.yaml")
FAST = ["--model.init_args.solver.init_args.iterations=2", "--trainer.enable_progress_bar=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _infer_single(cwd, *args: str) -> subprocess.CompletedProcess:
    """``python infer.py single ARGS`` as a user runs it (a subprocess, offline), from ``cwd``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "single", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        cwd=cwd,
    )


def test_help_lists_single_and_single_help_names_the_models():
    run = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert run.returncode == 0 and "{test,predict,single}" in run.stdout
    with pytest.raises(SystemExit) as exit_:
        single_args(["--help"])
    assert exit_.value.code == 0


def test_single_help_text_says_which_model_and_the_hub(capsys):
    with pytest.raises(SystemExit):
        single_args(["--help"])
    text = capsys.readouterr().out
    assert "ViT-B-16 (default)" in text and "Hugging Face hub" in text and "synthetic" in text and "tiny" in text


def test_config_fragment_stacks_on_the_defaults(region_folder, tmp_path, caplog):
    """A `--config` fragment alone used to replace the defaults and fail; now it stacks (here a fragment that names
    the tiny backbone by a path relative to itself)."""
    out = tmp_path / "out"
    masks = region_folder / "masks" / "a"
    fragment = tmp_path / "fragments" / "tiny_model.yaml"
    fragment.parent.mkdir()
    fragment.write_text(f"model:\n  init_args:\n    backbone: {os.path.relpath(TINY, fragment.parent)}\n")
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="RANDOM weights"):
        infer_main(
            [
                "single",
                str(region_folder / "images" / "a.png"),
                str(masks / "grey.png"),
                "--config",
                str(fragment),
                "--output",
                str(out),
                *FAST,
            ]
        )
    assert json.loads((out / "a" / "manifest.json").read_text())["weights"] == "random"
    assert (out / "config.yaml").is_file(), "the run's config belongs with its outputs"
    assert not (tmp_path / "config.yaml").exists(), "nothing in the working directory"
    assert f"{out}/" in caplog.text and "config.yaml" in caplog.text  # where did it go: printed at the end


def test_model_shortcut_and_overrides_are_never_prompts(region_folder, tmp_path, caplog):
    out = tmp_path / "out"
    masks = region_folder / "masks" / "a"
    caplog.set_level(logging.INFO)
    infer_main(
        [
            "single",
            str(region_folder / "images" / "a.png"),
            str(masks / "grey.png"),
            "--model",
            "tiny",
            "--prompts",
            "a cat",
            "a dog",
            '--model.init_args.prompt_templates=["a photo of a {}."]',
            "--output",
            str(out),
            *FAST,
        ]
    )
    manifest = json.loads((out / "a" / "manifest.json").read_text())
    assert manifest["prompts"] == ["a cat", "a dog"]
    best = manifest["regions"][0]["best_prompt"]
    assert "grey: final Dice loss" in caplog.text and f"best prompt {best!r}" in caplog.text
    assert "random weights: these numbers mean nothing" in caplog.text
    saved = (out / "config.yaml").read_text()
    assert "a photo of a {}." in saved and "re-tiny-vit" in saved


def test_single_translation():
    args = single_args(["img.png", "m.png", "--model", "synthetic", "--templates", "a {}.", "--trainer.devices=2"])
    backbone = json.loads(next(a for a in args if a.startswith("--model.init_args.backbone=")).split("=", 1)[1])
    assert backbone["init_args"] == {
        "model_name": zoo.MODELS["clip_synthetic"].model_name,
        "pretrained": "regionembed:clip_synthetic",
    }
    assert '--model.init_args.prompt_templates=["a {}."]' in args
    assert args[-1] == "--trainer.devices=2"
    rn = single_args(["i.png", "m.png", "--model", "RN50", "--weights", "none"])
    assert '"regionembed.backbones.OpenCLIPBackbone"' in rn[-1] and '"pretrained": null' in rn[-1]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--writer.overlays", "img.png", "m.png", "n.png"], "--writer.overlays"),  # was --writer.overlays=img.png
        (["img.png", "m.png", "--prompts", "a cat", "--some.flag", "a dog"], "--some.flag"),  # would take a prompt
        (["img.png", "m.png", "--trainer.devices", "2"], "--trainer.devices"),  # 2 may be a mask named 2
        (["img.png", "m.png", "--model.init_args.x", "-1"], "--model.init_args.x"),  # -1 is a word, not an option
    ],
)
def test_single_pass_through_option_never_takes_the_next_word(argv, option):
    """A pass-through option followed by a word: is the word its value, or the image, a mask, a prompt? Refused,
    naming the option and the unambiguous form, instead of taking the word (the image) as its value."""
    with pytest.raises(CLIError, match=rf"^{option}: .*write {option}=VALUE"):
        single_args(argv)


@pytest.mark.parametrize(
    ("argv", "passed"),
    [
        (["img.png", "m.png", "--some.flag"], ["--some.flag"]),  # last: nothing to take; jsonargparse judges it
        (["--some.flag", "--output", "o", "img.png", "m.png"], ["--some.flag"]),  # before an option
        (["img.png", "m.png", "--print_config"], ["--print_config"]),  # LightningCLI's one optional-value option
        (["img.png", "--x=a b", "m.png", "--y.z=[1, 2]"], ["--x=a b", "--y.z=[1, 2]"]),
        (["--w=1", "--", "img.png", "--m.png"], ["--w=1"]),  # after --, words only (a mask named --m.png)
    ],
)
def test_single_pass_through_options_that_are_unambiguous(argv, passed):
    args = single_args(argv)
    assert "--data.image=img.png" in args
    assert args[-len(passed) :] == passed
    masks = json.loads(next(a for a in args if a.startswith("--data.masks=")).split("=", 1)[1])
    assert masks == [a for a in argv if a.endswith(".png") and a != "img.png"]


def test_single_ambiguous_option_is_one_error_line_with_status_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["infer.py", "single", "--writer.overlays", "img.png", "m.png", "n.png"])
    with pytest.raises(SystemExit) as exit_:
        infer_main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --writer.overlays: ") and "--writer.overlays=VALUE" in err[0]


def test_single_short_config_flag_stacks_like_config():
    """LightningCLI takes -c for --config; so does single, in the order given, after the defaults."""
    args = single_args(["img.png", "m.png", "-c", "a.yaml", "--config", "b.yaml", "-cc.yaml", "-c=d.yaml"])
    configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    assert configs[1:] == ["a.yaml", "b.yaml", "c.yaml", "d.yaml"]
    assert configs[0].endswith("maskinversion.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "not-a-model"], r"--model not-a-model: not an open_clip model"),
        (["--model", "ViT-B-32"], r"--model ViT-B-32 needs --weights"),
        (["--model", "tiny", "--weights", "x.pt"], r"--model tiny chooses its own weights"),
    ],
)
def test_bad_model_choices_are_named(argv, message):
    with pytest.raises(CLIError, match=message):
        single_args(["img.png", "m.png", *argv])


def test_offline_default_model_is_one_line_naming_the_flag(region_folder, tmp_path):
    masks = region_folder / "masks" / "a"
    run = _infer_single(
        tmp_path, str(region_folder / "images" / "a.png"), str(masks / "grey.png"), "--output", str(tmp_path / "o")
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "💡" not in run.stderr + run.stdout
    errors = [line for line in run.stderr.splitlines() if "Hugging Face hub" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "--weights FILE" in errors[0]
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "config.yaml").exists()


def test_missing_checkpoint_says_how_to_make_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        infer_main(["test", f"--config={ROOT / 'configs' / 'tests' / 'tiny_region_cls.yaml'}", "--ckpt_path=nope.ckpt"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint not found: ckpt_path=nope.ckpt" in errors[0]
    assert "--ckpt_path=null" in errors[0]


def test_fit_says_where_checkpoints_and_exports_went(tmp_path, caplog):
    export = tmp_path / "model.safetensors"
    with caplog.at_level(logging.INFO):
        train_main(
            [
                "fit",
                f"--config={ROOT / 'configs' / 'tests' / 'tiny_clip.yaml'}",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                f"--model.init_args.export_path={export}",
            ]
        )
    assert export.is_file()
    assert f"exported weights: {export}" in caplog.text and "checkpoints (resume with" in caplog.text


def test_pretrained_null_on_the_command_line_means_random(region_folder, tmp_path):
    """`--...pretrained=null` reaches a nested `str | None` argument as the string "None"; it means no weights."""
    out = tmp_path / "out"
    masks = region_folder / "masks" / "a"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        infer_main(
            [
                "single",
                str(region_folder / "images" / "a.png"),
                str(masks / "grey.png"),
                "--output",
                str(out),
                "--model.init_args.backbone.init_args.model_name=re-tiny-vit",
                "--model.init_args.backbone.init_args.pretrained=null",
                *FAST,
            ]
        )
    assert json.loads((out / "a" / "manifest.json").read_text())["weights"] == "random"


@pytest.mark.parametrize("bad", ["missing_image", "missing_mask", "small_mask"])
def test_bad_input_files_found_during_the_run_are_one_line(region_folder, tmp_path, bad):
    """Images and masks are read while the run goes: their errors are one `error:` line too, not a traceback."""
    from PIL import Image

    image, mask = region_folder / "images" / "a.png", region_folder / "masks" / "a" / "grey.png"
    if bad == "missing_image":
        image = tmp_path / "nope.png"
    elif bad == "missing_mask":
        mask = tmp_path / "nope_mask.png"
    else:
        mask = tmp_path / "small.png"
        Image.new("L", (10, 10), 255).save(mask)
    run = _infer_single(tmp_path, str(image), str(mask), "--model", "tiny", "--output", str(tmp_path / "o"), *FAST)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(image.name if bad == "missing_image" else mask.name) in errors[0]


def test_a_test_run_without_results_keeps_its_config_out_of_other_folders(tmp_path):
    infer_main(
        [
            "test",
            f"--config={ROOT / 'configs' / 'tests' / 'tiny_region_cls.yaml'}",
            f"--writer.output_dir={tmp_path / 'predictions'}",
        ]
    )
    assert (tmp_path / "outputs" / "test" / "config.yaml").is_file()
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "config.yaml").exists()
