"""LightningCLI entry points: ``regionembed-infer`` (test/predict, plus ``single``) and ``regionembed-train``.

The repository's ``infer.py`` and ``train.py`` call the same functions. ``--config regionembed:<name>`` names a config
shipped in the package (:mod:`regionembed.config_files`), so an installed package runs from any directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import zoo
from .backbones.attention import UnsupportedModelError
from .backbones.base import Backbone
from .backbones.weights import PretrainedWeightsUnavailable
from .callbacks import InversionWriter
from .callbacks.writer import image_folder
from .config_files import config_path, expand_config_args
from .io import InputError
from .outputs import check_output_dir

__all__ = [
    "CLIError",
    "InferCLI",
    "TrainCLI",
    "infer_command",
    "infer_main",
    "quiet_known_noise",
    "single_args",
    "train_command",
    "train_main",
]

#: the shipped config that ``single`` stacks its ``--config`` fragments on
DEFAULT_INFER_CONFIG = "infer/maskinversion.yaml"
PRETRAINED_KEY = "model.init_args.backbone.init_args.pretrained"

#: ``infer.py single --model`` shortcuts: (open_clip architecture, ``pretrained``)
SINGLE_MODELS: dict[str, tuple[str, str | None]] = {
    "synthetic": (zoo.MODELS["clip_synthetic"].model_name, "regionembed:clip_synthetic"),
    "tiny": ("re-tiny-vit", None),
}

#: errors that mean "bad setting or file" when raised while building the model and data: shown as one line
SETTING_ERRORS = (PretrainedWeightsUnavailable, UnsupportedModelError, ValueError, FileNotFoundError)


class CLIError(RuntimeError):
    """A problem with the command line or the files it names, reported as one line by the entry points."""


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


def quiet_known_noise() -> None:
    """Drop Lightning's advertising tips and a known deprecation notice from the console; real warnings stay."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip:")

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    # torch 2.10+ deprecates LeafSpec, which Lightning 2.6 still uses internally; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning 2.6's SaveConfigCallback passes jsonargparse's deprecated skip_none
    warnings.filterwarnings("ignore", message=r"\s*skip_none parameter was deprecated")


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a nested jsonargparse Namespace / dict."""
    items = vars(node).items() if hasattr(node, "__dict__") and not isinstance(node, dict) else None
    if items is None and isinstance(node, dict):
        items = node.items()
    if items is None:
        yield prefix, node
        return
    for key, value in items:
        yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))


def _root_cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``err``'s cause/context chain (jsonargparse wraps errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def preprocess_of(model: L.LightningModule) -> Any:
    """The preprocessing spec of ``model.backbone`` (None for a model without one): what data modules resize to."""
    return getattr(getattr(model, "backbone", None), "preprocess", None)


def needs_original_image_of(model: L.LightningModule) -> bool:
    """Whether ``model`` crops from the original pixels (its ``needs_original_image``): the data module then keeps
    them (``keep_original``)."""
    return bool(getattr(model, "needs_original_image", False))


class _RegionembedCLI(LightningCLI):
    """What both entry points share: settings checked before any compute, bad settings or files reported in one line.

    Errors raised while the classes are built (a corrupt weights file, ``layers`` out of range, duplicate prompts,
    ``lr=0``, weights that need the hub offline) become ``error: <message>`` with exit status 2, as jsonargparse
    reports a bad option. Set ``JSONARGPARSE_DEBUG=true`` to get the traceback instead.
    """

    #: the way out per config key, named in error messages (``single`` points ``pretrained`` at ``--weights``)
    flag_names: ClassVar[dict[str, str]] = {}

    def check_config(self, config) -> None:
        """Validate the parsed ``config`` of the subcommand before instantiation (raise ``ValueError``)."""
        ckpt = config.get("ckpt_path")
        if ckpt and ckpt not in ("last", "best", "hpc") and not Path(ckpt).expanduser().is_file():
            raise ValueError(
                f"checkpoint not found: ckpt_path={ckpt}. It is written by a training run (`python train.py fit "
                "--config configs/train/...yaml`, or `regionembed-train fit --config regionembed:train/...yaml` from "
                "an installed package; see this config's header); `--ckpt_path=null` evaluates the "
                "model as configured instead (e.g. the zero-shot backbone)"
            )

    def add_arguments_to_parser(self, parser) -> None:
        # The data module resizes and normalises for the model: its `preprocess` comes from the instantiated model's
        # backbone, and `keep_original` from whether its methods crop from the original pixels, so configs never
        # restate them (and cannot disagree with the model). Data modules without such an argument are left alone.
        parser.link_arguments("model", "data.init_args.preprocess", compute_fn=preprocess_of, apply_on="instantiate")
        parser.link_arguments(
            "model", "data.init_args.keep_original", compute_fn=needs_original_image_of, apply_on="instantiate"
        )

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
            cause = _root_cause(err, PretrainedWeightsUnavailable)
            if cause is not None and cause.reason != str(cause):  # the hub is needed: name this CLI's flag
                remedy = self.flag_names.get(
                    PRETRAINED_KEY, f"set --{PRETRAINED_KEY}=FILE to a local weights file (.safetensors, .bin, .pt)"
                )
                self.parser.error(f"{cause.reason}: {remedy}", ex=err)
            self.parser.error(root_cause(err), ex=err)


class InferCLI(_RegionembedCLI):
    """``test`` and ``predict`` with inference mode off (MaskInversion optimises inside the loop) and a writer.

    A run's ``config.yaml`` goes next to its results (the writer's folder for ``predict``, the folder of the model's
    ``results_path`` for ``test``, else ``outputs/test``) unless ``trainer.default_root_dir`` is set; the end of a
    run prints where everything was written.
    """

    def __init__(self, *args, flag_names: dict[str, str] | None = None, **kwargs) -> None:
        self.flag_names = dict(flag_names or {})
        kwargs.setdefault("trainer_defaults", {})
        kwargs["trainer_defaults"] = {"inference_mode": False, **kwargs["trainer_defaults"]}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}, "predict": {"model", "dataloaders", "datamodule"}}

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `single` is translated into `predict` before parsing (see `single_args`); listed here for --help only.
        # LightningCLI and jsonargparse have no public hook for an extra subcommand: these two private names are the
        # only ones reached, guarded so that a library change drops the help line (test_cli_usability notices)
        # instead of breaking the CLI.
        action = getattr(parser, "_subcommands_action", None)
        if action is not None and hasattr(action, "add_subcommand"):
            action.add_subcommand(
                "single",
                argparse.ArgumentParser(prog="infer.py single", add_help=False),
                help="MaskInversion on one image and its mask files (see `infer.py single --help`)",
            )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer saves them; keeping all in memory does not scale
        return kwargs

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(InversionWriter, "writer")
        parser.set_defaults({"writer.output_dir": "outputs/maskinversion"})

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        backbone = getattr(self.model, "backbone", None)  # a module without a backbone warns about nothing
        config = self.config[self.subcommand]
        if isinstance(backbone, Backbone) and backbone.weights == "random" and not config.get("ckpt_path"):
            rank_zero_warn(
                f"{type(backbone).__name__}({backbone.model_name!r}) has RANDOM weights "
                "(pretrained: null): its maps, embeddings and prompt probabilities mean nothing. Use real weights "
                "for results (`infer.py single --help` lists the choices)."
            )

    def _results_path(self, config) -> str | None:
        return dict(_walk(config)).get("model.init_args.results_path")

    def check_config(self, config) -> None:
        super().check_config(config)
        if self.subcommand == "predict":  # found now, not after the compute
            try:
                check_output_dir(config["writer"]["output_dir"])
            except ValueError as err:
                raise ValueError(f"--writer.output_dir: {err}") from err
        if config.trainer.get("default_root_dir") is None:
            results = self._results_path(config)
            if self.subcommand == "predict":
                config.trainer.default_root_dir = str(config.writer.output_dir)
            else:  # test: next to its results table, or a folder of its own (never the working directory itself)
                config.trainer.default_root_dir = str(Path(results).parent if results else Path("outputs") / "test")

    def _single_summary(self, output_dir: str) -> list[str]:
        """Each region's best prompt, from the manifest of the one image of ``infer.py single``."""
        image = getattr(self.datamodule, "image", None)
        if image is None:
            return []
        folder = image_folder(output_dir, Path(image).stem)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return []
        lines = [f"{Path(image).name} (weights: {manifest.get('weights', 'unknown')}):"]
        for region in manifest["regions"]:
            line = f"  {region['name']}: final Dice loss {region['final_dice_loss']:.3f}"
            if "best_prompt" in region:
                p = region["prompt_probabilities"][region["best_prompt"]]
                line += f", best prompt {region['best_prompt']!r} (p = {p:.2f})"
            lines.append(line)
        if manifest.get("weights") == "random":
            lines.append("  (random weights: these numbers mean nothing)")
        return [*lines, f"files: {folder}/"]

    def _report(self) -> None:
        config = self.config[self.subcommand]
        lines = []
        if self.subcommand == "predict":
            lines += self._single_summary(config.writer.output_dir)
            lines.append(f"results (embeddings, overlays, manifest per image): {Path(config.writer.output_dir)}/")
        results = self._results_path(config)
        if results:
            lines.append(f"results table (JSON): {results}")
        lines.append(f"run config: {Path(self.trainer.log_dir or config.trainer.default_root_dir) / 'config.yaml'}")
        rank_zero_info("\n".join(lines))

    def after_predict(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


class TrainCLI(_RegionembedCLI):
    """``fit``/``validate``/``test`` for the trainable baselines (any LightningModule given by class path).

    The end of ``fit`` prints where the checkpoints, logs, the run's config and any exported weights went.
    """

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

    def after_fit(self) -> None:
        lines = []
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            lines.append(f"checkpoints (resume with --ckpt_path <dir>/last.ckpt): {checkpoint.dirpath}/")
        if self.trainer.log_dir:
            lines.append(f"logs and run config: {self.trainer.log_dir}/")
        export = self.model.hparams.get("export_path")
        if export:
            lines.append(f"exported weights: {export}")
        if lines:
            rank_zero_info("\n".join(lines))


SINGLE_EPILOG = """\
Models (--model):
  ViT-B-16 (default)  OpenAI CLIP ViT-B/16; --weights openai downloads it from the Hugging Face hub, offline give a
                      local weights file: --weights /path/to/open_clip_model.safetensors (.bin/.pt also work)
  synthetic           the CLIP this project trains on its synthetic world (no download; it knows coloured shapes,
                      not photos)
  tiny                a tiny random model: checks the pipeline, its maps and probabilities mean nothing
  NAME                any open_clip model name (open_clip.list_models()), with --weights TAG_OR_FILE

Anything else is passed on to `infer.py predict`; write --key=value (`--key value` is refused: the value could
be the image, a mask or a prompt), e.g.
  --model.init_args.solver.init_args.iterations=20 --trainer.accelerator=cuda --writer.overlays=false
-c/--config FILE adds YAML fragments on top of the defaults (regionembed:infer/maskinversion.yaml), in order.

Examples:
  infer.py single photo.jpg cat.png dog.png --prompts "a cat" "a dog" --weights ~/clip/ViT-B-16.safetensors
  infer.py single scene.png region.png --model synthetic --prompts "a red circle" "a blue square"
"""


def _single_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer.py single",
        description="MaskInversion on one image: a localized embedding per mask, its map overlaid on the image, and "
        "optional prompt matching, written to --output.",
        epilog=SINGLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("image", help="image file (jpg, png, bmp, webp, tif)")
    parser.add_argument("masks", nargs="+", help="mask files, the image's size (grey/RGB/RGBA/palette; 0/255 or 0/1)")
    parser.add_argument("--prompts", nargs="+", default=None, help="texts to match each region against")
    parser.add_argument(
        "--templates", nargs="+", default=None, help='prompt templates averaged per prompt, e.g. "a photo of a {}."'
    )
    parser.add_argument("--model", default=None, help="synthetic, tiny, or an open_clip model name (default ViT-B-16)")
    parser.add_argument(
        "--weights", default=None, help="hub tag (openai) or local weights file for --model; 'none' for random init"
    )
    parser.add_argument("--output", default="outputs/single", help="output folder (default: outputs/single)")
    parser.add_argument(
        "-c", "--config", action="append", default=None, help="YAML fragment(s) stacked on the defaults, in order"
    )
    return parser


#: argparse reads these as words, not options (its ``_negative_number_matcher``; single has no numeric options)
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _is_word(token: str) -> bool:
    """Whether argparse would read ``token`` as a positional (the image, a mask, a prompt) rather than an option."""
    if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
        return True
    return not token.startswith("--") and " " in token  # "-a b": argparse's rule for unknown dashed words


def _split_overrides(argv: Sequence[str], own: set[str]) -> tuple[list[str], list[str]]:
    """Separate ``--key[=value]`` options that ``single`` does not know (passed on to predict) from its own.

    argparse would take an unknown option containing a space (``--x=["a photo of a {}."]``) for a positional value,
    i.e. a prompt; splitting first means options are never swallowed as prompts or masks. Per form:

    - ``--key=value``: passed on as it is.
    - ``--key`` last, or before another option: passed on bare; LightningCLI judges it (``--print_config`` takes
      no value, a setting says "expected one argument").
    - ``--key WORD``: refused. jsonargparse would take WORD as the value, but here WORD may as well be the image, a
      mask or a prompt (``--writer.overlays photo.jpg``), and guessing would run on the wrong files.
    - after ``--``: only words (positionals), as in argparse.

    Raises:
        CLIError: ``--key WORD``, naming the option and the ``--key=VALUE`` form.
    """
    mine, passed = [], []
    for i, token in enumerate(argv):
        if token == "--":
            return mine + list(argv[i:]), passed
        if not token.startswith("--") or token.split("=", 1)[0] in own:
            mine.append(token)
            continue
        passed.append(token)
        if "=" not in token and i + 1 < len(argv) and _is_word(argv[i + 1]):
            raise CLIError(
                f"{token}: options passed on to predict take their value after '=': write {token}=VALUE "
                f"(is {argv[i + 1]!r} its value, or the image, a mask or a prompt?)"
            )
    return mine, passed


def _backbone_for(model: str, weights: str | None) -> dict[str, Any]:
    """The ``model.init_args.backbone`` config for ``single``'s ``--model``/``--weights``."""
    import open_clip

    if model in SINGLE_MODELS:
        name, pretrained = SINGLE_MODELS[model]
        if weights is not None:
            raise CLIError(f"--model {model} chooses its own weights; drop --weights {weights}")
    else:
        name = model
        if name not in open_clip.list_models():
            raise CLIError(
                f"--model {name}: not an open_clip model nor one of {sorted(SINGLE_MODELS)} "
                "(open_clip.list_models() lists the names)"
            )
        if weights is None:
            raise CLIError(f"--model {name} needs --weights: a hub tag (e.g. openai), a local weights file, or none")
        pretrained = None if weights.lower() == "none" else weights
    # OpenCLIPBackbone picks the adapter for the model's image tower (ViT, ResNet, ...)
    return {
        "class_path": "regionembed.backbones.OpenCLIPBackbone",
        "init_args": {"model_name": name, "pretrained": pretrained},
    }


def single_args(argv: Sequence[str]) -> list[str]:
    """Translate ``single IMAGE MASK... [--prompts ...] [--model ...]`` into ``predict`` arguments of InferCLI.

    ``-c``/``--config`` fragments stack on the defaults (``regionembed:infer/maskinversion.yaml``); unknown
    ``--key=value`` options are passed on unchanged (see :func:`_split_overrides` for the other forms).

    Raises:
        CLIError: an unknown ``--model``, a ``--model``/``--weights`` combination that cannot work, or an unknown
            option followed by a word (``--key WORD``).
    """
    parser = _single_parser()
    own = {opt for action in parser._actions for opt in action.option_strings}
    mine, overrides = _split_overrides(list(argv), own)
    args = parser.parse_args(mine)
    out = [
        "predict",
        f"--config={config_path(DEFAULT_INFER_CONFIG)}",
        *(f"--config={c}" for c in args.config or []),
        "--data=regionembed.data.RegionFolderDataModule",
        "--data.root=null",
        f"--data.image={args.image}",
        f"--data.masks={json.dumps(list(args.masks))}",
        f"--writer.output_dir={args.output}",
        "--return_predictions=false",
    ]
    if args.model is not None or args.weights is not None:
        backbone = _backbone_for(args.model or "ViT-B-16", args.weights)
        out.append(f"--model.init_args.backbone={json.dumps(backbone)}")
    if args.prompts:
        out.append(f"--model.init_args.prompts={json.dumps(list(args.prompts))}")
    if args.templates:
        out.append(f"--model.init_args.prompt_templates={json.dumps(list(args.templates))}")
    return out + overrides


SINGLE_FLAGS = {
    PRETRAINED_KEY: "give a local weights file with --weights FILE (.safetensors, .bin, .pt), or try --model synthetic"
}


def _run(make_cli, argv: Sequence[str] | None):
    """Run a CLI; from the command line (``argv is None``) user errors print one line and exit with status 2.

    User errors: :class:`CLIError` and :class:`~regionembed.io.InputError` (an image or mask found missing or bad
    while the run reads it). ``REGIONEMBED_DEBUG=1`` shows the traceback instead.
    """
    quiet_known_noise()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if argv is not None:
        return make_cli(list(argv))
    try:
        return make_cli(None)
    except (CLIError, InputError) as err:  # bad command line, or an input file found bad while the run reads it
        if os.environ.get("REGIONEMBED_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _expand(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``regionembed:<name>`` configs replaced by their shipped files (an unknown name: CLIError)."""
    try:
        return expand_config_args(argv)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None


def infer_main(argv: Sequence[str] | None = None) -> InferCLI:
    """``regionembed-infer {test,predict} --config ...`` or ``regionembed-infer single IMAGE MASK...``.

    ``python infer.py`` in a checkout is the same command.
    """

    def make(args: list[str] | None) -> InferCLI:
        if args is None:
            # Read sys.argv through LightningCLI (args=None): DDP launchers re-run this script with sys.argv, so
            # the translated arguments (single-image, shipped config names) are written back there.
            single = sys.argv[1:2] == ["single"]
            sys.argv = [sys.argv[0], *_expand(single_args(sys.argv[2:]) if single else sys.argv[1:])]
            return InferCLI(args=None, flag_names=SINGLE_FLAGS if single else None)
        if args and args[0] == "single":
            return InferCLI(args=_expand(single_args(args[1:])), flag_names=SINGLE_FLAGS)
        return InferCLI(args=_expand(args))

    return _run(make, argv)


def train_main(argv: Sequence[str] | None = None) -> TrainCLI:
    """``regionembed-train {fit,validate,test} --config ...`` (``python train.py`` in a checkout)."""

    def make(args: list[str] | None) -> TrainCLI:
        if args is None:  # written back to sys.argv for DDP launchers, as in infer_main
            sys.argv = [sys.argv[0], *_expand(sys.argv[1:])]
        return TrainCLI(args=None if args is None else _expand(args))

    return _run(make, argv)


def infer_command() -> None:
    """Console script ``regionembed-infer``: :func:`infer_main` on ``sys.argv`` (its exit status is the CLI's)."""
    infer_main()


def train_command() -> None:
    """Console script ``regionembed-train``: :func:`train_main` on ``sys.argv``."""
    train_main()
