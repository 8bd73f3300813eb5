"""The synthetic-CLIP probe reports both image routes; the ETA logger's formatting."""

import pytest

from regionembed.backbones import OpenCLIPBackbone
from regionembed.bench.probe import probe_synthetic_clip
from regionembed.callbacks.progress import format_seconds


def test_probe_reports_model_and_mean_token_routes():
    backbone = OpenCLIPBackbone("re-synth-vit").eval()  # random weights: structure only
    report = probe_synthetic_clip(backbone, scenes=6, templates=("a {}.",))
    assert report["single_object_scenes"] == 6 and report["test_regions"] > 500
    routes = report["templates"]["a {}."]
    assert set(routes) == {"model", "mean_tokens"}
    for scores in routes.values():
        assert set(scores) == {"accuracy", "colour", "shape"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert scores["accuracy"] <= min(scores["colour"], scores["shape"])


@pytest.mark.parametrize(("seconds", "text"), [(42.4, "42 s"), (725, "12 min 05 s"), (3720, "1 h 02 min"), (-3, "0 s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
