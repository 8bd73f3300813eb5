"""LightningCLI entry points: ``python infer.py`` (test/predict, plus ``single``) and ``python train.py``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .backbones.attention import UnsupportedModelError
from .backbones.weights import PretrainedWeightsUnavailable
from .callbacks import InversionWriter
from .outputs import check_output_dir

__all__ = ["InferCLI", "TrainCLI", "infer_main", "train_main"]

DEFAULT_INFER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "infer" / "maskinversion.yaml"

#: errors that mean "bad setting or file" when raised while building the model and data: shown as one line
SETTING_ERRORS = (PretrainedWeightsUnavailable, UnsupportedModelError, ValueError, FileNotFoundError)


class CheckFirstMixin:
    """Check settings before any compute and report bad settings or files in one line instead of a traceback.

    Errors raised while the classes are built (a corrupt weights file, ``layers`` out of range, duplicate prompts,
    ``lr=0``) become ``error: <message>`` with exit status 2, as jsonargparse reports a bad option. Set
    ``JSONARGPARSE_DEBUG=true`` to get the traceback instead.
    """

    def check_config(self, config) -> None:
        """Validate the parsed ``config`` of the subcommand before instantiation (raise ``ValueError``)."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        try:
            self.check_config(config)
        except ValueError as err:
            self.parser.error(str(err))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except SETTING_ERRORS as err:
            self.parser.error(root_cause(err), ex=err)


def root_cause(err: BaseException) -> str:
    """The message of the outermost of our errors in ``err``'s chain (jsonargparse wraps them in its own)."""
    first, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, SETTING_ERRORS) and not text.startswith(("Does not validate", "Problem with given")):
            return text
        err = err.__cause__ or err.__context__
    return str(first)


class InferCLI(CheckFirstMixin, LightningCLI):
    """``test`` and ``predict`` with inference mode off (MaskInversion optimises inside the loop) and a writer."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {})
        kwargs["trainer_defaults"] = {"inference_mode": False, **kwargs["trainer_defaults"]}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}, "predict": {"model", "dataloaders", "datamodule"}}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer saves them; keeping all in memory does not scale
        return kwargs

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(InversionWriter, "writer")
        parser.set_defaults({"writer.output_dir": "outputs/maskinversion"})

    def check_config(self, config) -> None:
        if self.subcommand == "predict":  # found now, not after the compute
            try:
                check_output_dir(config["writer"]["output_dir"])
            except ValueError as err:
                raise ValueError(f"--writer.output_dir: {err}") from err


class TrainCLI(CheckFirstMixin, LightningCLI):
    """``fit``/``validate``/``test`` for the trainable baselines (any LightningModule given by class path)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }


def single_args(argv: Sequence[str]) -> list[str]:
    """Translate ``single IMAGE MASK... [--prompts ...]`` into ``predict`` arguments of :class:`InferCLI`."""
    parser = argparse.ArgumentParser(
        prog="infer.py single",
        description="MaskInversion on one image: embeddings, overlays and prompt matching in --output.",
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("masks", nargs="+", help="mask files (grey or RGBA PNG, 0/255 or 0/1), same size as image")
    parser.add_argument("--prompts", nargs="*", default=None, help="texts to match each region against")
    parser.add_argument("--output", default="outputs/single", help="output directory")
    parser.add_argument(
        "--config", action="append", default=None, help="config file(s), stacked in order (default: maskinversion)"
    )
    args, overrides = parser.parse_known_args(list(argv))
    out = [
        "predict",
        *(f"--config={c}" for c in (args.config or [str(DEFAULT_INFER_CONFIG)])),
        "--data=regionembed.data.RegionFolderDataModule",
        "--data.root=null",
        f"--data.image={args.image}",
        f"--data.masks={json.dumps(list(args.masks))}",
        f"--writer.output_dir={args.output}",
        "--return_predictions=false",
    ]
    if args.prompts:
        out.append(f"--model.init_args.prompts={json.dumps(list(args.prompts))}")
    return out + overrides


def infer_main(argv: Sequence[str] | None = None) -> InferCLI:
    """``python infer.py {test,predict} --config ...`` or ``python infer.py single IMAGE MASK...``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if argv is None:
        # Read sys.argv through LightningCLI (args=None): DDP launchers re-run this script with sys.argv, so the
        # translated single-image arguments are written back there.
        if sys.argv[1:2] == ["single"]:
            sys.argv = [sys.argv[0], *single_args(sys.argv[2:])]
        return InferCLI(args=None)
    argv = list(argv)
    if argv and argv[0] == "single":
        argv = single_args(argv[1:])
    return InferCLI(args=argv)


def train_main(argv: Sequence[str] | None = None) -> TrainCLI:
    """``python train.py {fit,validate,test} --config ...``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return TrainCLI(args=None if argv is None else list(argv))
