"""``regionembed:<name>`` configs on the command line: which values are replaced, and the errors."""

import pytest

from regionembed.cli import CLIError, infer_main
from regionembed.config_files import config_dir, config_path, expand_config_args, list_configs


def test_names_resolve_inside_the_package():
    path = config_path("regionembed:infer/region_cls_synthetic.yaml")
    assert path == config_dir() / "infer" / "region_cls_synthetic.yaml" and path.is_file()
    assert config_path("infer/region_cls_synthetic") == path  # the prefix and the suffix are optional here
    assert "train/overrides/noattn.yaml" in list_configs() and "backbone/tiny.yaml" in list_configs()


@pytest.mark.parametrize("name", ["infer/nope.yaml", "../pyproject.toml", "/etc/passwd", "backbone"])
def test_unknown_or_outside_names_are_refused_with_the_list(name):
    with pytest.raises(FileNotFoundError, match=r"no such config shipped with regionembed.*regionembed:backbone/tiny"):
        config_path(name)


def test_only_config_values_are_replaced():
    tiny = str(config_path("backbone/tiny.yaml"))
    main = str(config_path("infer/maskinversion.yaml"))
    argv = [
        "predict",
        "--config",
        "regionembed:infer/maskinversion",
        "-c=regionembed:backbone/tiny.yaml",
        "--model.init_args.backbone=regionembed:backbone/tiny.yaml",
        "--model.init_args.backbone",
        "regionembed:backbone/tiny.yaml",
        "--model.init_args.backbone.init_args.pretrained=regionembed:clip_synthetic",  # weights, not a config
        "--model.init_args.prompts",
        "regionembed:a prompt",
        "regionembed:x.yaml",  # a positional value (e.g. an image name) is never a config
    ]
    assert expand_config_args(argv) == [
        "predict",
        "--config",
        main,
        f"-c={tiny}",
        f"--model.init_args.backbone={tiny}",
        "--model.init_args.backbone",
        tiny,
        "--model.init_args.backbone.init_args.pretrained=regionembed:clip_synthetic",
        "--model.init_args.prompts",
        "regionembed:a prompt",
        "regionembed:x.yaml",
    ]


def test_an_unknown_name_is_a_cli_error():
    with pytest.raises(CLIError, match="regionembed:infer/region_cls_synth: no such config"):
        infer_main(["test", "--config=regionembed:infer/region_cls_synth", "--print_config"])
