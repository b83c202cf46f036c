"""``visionzoo fit|validate|test|predict``: Lightning's CLI over the tasks and data modules.

A recipe is a LightningCLI YAML file (``model:`` a task, ``data:`` a data module, ``trainer:``).
The CLI links the two: the data module reads the model's normalisation from ``model_name``, and
the task gets ``num_classes`` from the data. Unless the recipe says otherwise, a run under
``trainer.default_root_dir`` (default: the working directory) keeps

- ``checkpoints/last.ckpt`` (at each validation, and every ``--last_every_n_steps`` or else every
  ``--last_every_minutes``, 30 by default; ``--ckpt_path last`` resumes from it, mid-epoch included:
  the training loader is stateful) and the best checkpoint by the task's validation metric;
- CSV and TensorBoard logs under ``logs/``, ``learning_curves.png`` beside the CSV at the end of ``fit`` and
  ``test_predictions.png`` (the first test images with the predictions drawn) at the end of ``test``;
- a rich progress bar;
- checkpoints written atomically and durably (a temporary file fsynced and renamed into place), and a stop with the step
  named at a NaN/Inf loss, before it reaches the weights.

``fit`` then tests the best checkpoint when the data has a test split (``--test_after_fit false`` skips it).

Recipes are code: a ``class_path`` names any importable class, a ``Callable`` argument any function.
Only what lies under :data:`visionzoo.allowlist.ALLOWED_NAMESPACES` may be imported, from recipe files,
command-line overrides and a ``--ckpt_path`` file's hyper-parameters, checked before anything is
imported (:mod:`visionzoo.allowlist`), unless ``--allow_any_class_path`` is given.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from visionzoo.allowlist import ALLOW_ANY_FLAG, UnsafeRecipeError, check_command_line, check_imports, import_policy
from visionzoo.backbones.helpers import PretrainedWeightsError
from visionzoo.data.base import VisionDataModule
from visionzoo.pictures import PredictionsPicture, find_csv_logger

__all__ = [
    "AtomicCheckpointIO",
    "LearningCurves",
    "NonFiniteLossError",
    "RecipeError",
    "StopOnNonFiniteLoss",
    "VisionZooCLI",
    "run_cli",
]

_DATA_STAGES = ("fit", "validate", "test", "predict")  # subcommands named as LightningDataModule.setup's stages


class RecipeError(ValueError):
    """A recipe that cannot be built: the message is the root cause (a missing data path, an empty
    split, a bad transform, ...), without jsonargparse's wrapping."""


class LearningCurves(Callback):
    """At the end of ``fit``, plots every logged ``train/*`` and ``val/*`` metric of the CSV log
    against the step into ``learning_curves.png`` beside ``metrics.csv``."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = find_csv_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        logger.save()
        path = Path(logger.log_dir) / "metrics.csv"
        if path.is_file():
            out = plot_learning_curves(path)
            if out is not None:
                print(f"learning curves: {out}")


def plot_learning_curves(metrics_csv: Path) -> Path | None:
    """``learning_curves.png`` beside ``metrics_csv``: one panel per metric, x = step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as stream:
        for row in csv.DictReader(stream):
            for name, value in row.items():
                if name.startswith(("train/", "val/")) and value not in ("", None) and "lr" not in name:
                    series[name].append((int(row["step"]), float(value)))
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        axis.plot(steps, values, marker="o" if name.startswith("val/") else None, markersize=3)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.tight_layout()
    out = metrics_csv.with_name("learning_curves.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss."""


class StopOnNonFiniteLoss(Callback):
    """Stops training at a NaN/Inf loss before its backward pass touches the weights, naming the step;
    the checkpoints on disk are the last good ones."""

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss) -> None:
        if not bool(loss.detach().isfinite().all()):
            checkpoint = trainer.checkpoint_callback
            last = getattr(checkpoint, "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); last good checkpoint: {last}"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint durably and atomically: into a temporary file in the same directory,
    fsynced, renamed into place, and the directory fsynced, so that a killed process or a power loss
    leaves the previous ``last.ckpt`` whole for ``--ckpt_path last``. An error removes the temporary
    file; one left by a killed process is removed at the next save of the same checkpoint. Remote
    paths (``s3://...``) go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.partial"):
            stale.unlink(missing_ok=True)
        descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# Lines of jsonargparse's nested union report that repeat for every optional class argument, or dump a section
_PARSE_ERROR_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes: [",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type: <class 'dict'>",
    "Given value: {",
    "Given value type: <class 'jsonargparse.",
    "Given value: NestedArg(",
    "Given value: Namespace(",
)


def one_line_parse_error(message: str) -> str:
    """jsonargparse's parse error in one line: the nested keys and the innermost problem."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line.removeprefix("- ") for line in lines if line and not line.startswith(_PARSE_ERROR_NOISE))


class RecipeArgumentParser(LightningArgumentParser):
    """Reports a parse error as ``error: <keys>: <problem>`` and a tip, without jsonargparse's usage (a hundred
    lines for a recipe, printed before the error)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # raising, not exiting: its own way
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {one_line_parse_error(message)}\n")
        sys.stderr.write(f"tip: {parser.prog.replace(' [options]', '')} --help lists the options\n")
        self.exit(2)


class VisionZooCLI(LightningCLI):
    """LightningCLI with the links between task and data, the project's run layout, and class paths
    restricted to :data:`ALLOWED_NAMESPACES` unless ``allow_any_class_path``."""

    def __init__(self, *args, allow_any_class_path: bool = False, **kwargs):
        self.allow_any_class_path = allow_any_class_path
        with import_policy(enforced=not allow_any_class_path):
            super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if not self.allow_any_class_path:  # before jsonargparse imports anything the recipe names
            if not isinstance(args, dict):  # a configuration given as a dict: jsonargparse's policy alone guards it
                check_command_line(list(args) if args is not None else sys.argv[1:])
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            if isinstance(self.datamodule, VisionDataModule) and self.subcommand in _DATA_STAGES:
                # the splits the run needs, built (and cached) now: a missing or empty one is a recipe error
                self.datamodule.setup(self.subcommand)
        except (ValueError, TypeError, OSError, KeyError, MisconfigurationException) as error:
            root = error
            while root.__cause__ is not None and not isinstance(root, PretrainedWeightsError):  # it says what to do
                root = root.__cause__
            raise RecipeError(f"the recipe could not be built: {type(root).__name__}: {root}") from error

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument("--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit")
        # every subcommand reads them, so that a recipe that sets them also serves validate and test
        parser.add_argument(
            "--last_every_n_steps",
            type=int | None,
            default=None,
            help="fit: also write checkpoints/last.ckpt every N training steps (a kill loses at most N steps)",
        )
        parser.add_argument(
            "--last_every_minutes",
            type=float | None,
            default=30.0,
            help="fit: otherwise every M minutes of training (null: last.ckpt only at validation)",
        )
        return parser

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        root = Path(config.get("default_root_dir") or os.getcwd())
        if config.get("logger") in (None, True):
            csv_logger = CSVLogger(root, name="logs")
            config["logger"] = [csv_logger, TensorBoardLogger(root, name="logs", version=csv_logger.version)]
        given = [*callbacks, *(config.get("callbacks") or [])]
        # Lightning 2.6's save_last writes last.ckpt at train end even under fast_dev_run, which should save nothing
        wants_checkpoints = config.get("enable_checkpointing", True) is not False and not config.get("fast_dev_run")
        if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks += self._interval_checkpoint(root / "checkpoints")
            monitor = getattr(self.model, "monitor", None)
            callbacks.append(
                ModelCheckpoint(
                    dirpath=root / "checkpoints",
                    filename="best-{epoch}-{step}",
                    monitor=monitor,
                    mode="min" if monitor and monitor.endswith("loss") else "max",
                    save_last=True,
                    enable_version_counter=False,
                )
            )
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, RichProgressBar) for c in given
        ):
            callbacks.append(RichProgressBar())
        callbacks += [LearningCurves(), StopOnNonFiniteLoss(), PredictionsPicture()]
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _interval_checkpoint(self, dirpath: Path) -> list[ModelCheckpoint]:
        """``last.ckpt`` between validations, every ``last_every_n_steps`` or ``last_every_minutes`` of ``fit``."""
        options = self.config.get("fit", {}) if self.subcommand == "fit" else {}
        steps, minutes = options.get("last_every_n_steps"), options.get("last_every_minutes")
        if (steps is not None and steps < 1) or (minutes is not None and minutes <= 0):
            raise RecipeError(f"last_every_n_steps and last_every_minutes must be positive, got {steps} and {minutes}")
        if steps is None and minutes is None:
            return []
        trigger = dict(every_n_train_steps=steps) if steps else dict(train_time_interval=timedelta(minutes=minutes))
        # one last.ckpt for this and the validation-time checkpoint: no version counter (last-v1.ckpt)
        return [ModelCheckpoint(dirpath=dirpath, save_top_k=0, save_last=True, enable_version_counter=False, **trigger)]

    def _parse_ckpt_path(self) -> None:
        """Lightning merges a ``--ckpt_path`` file's hyper-parameters into the configuration first (and imports
        their ``_class_path``): a corrupt file, or one that names code outside the allowed namespaces, ends here."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        try:
            if ckpt_path and Path(ckpt_path).is_file() and not self.allow_any_class_path:
                hyper_parameters = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
                check_imports(hyper_parameters.get("hyper_parameters", {}), f"--ckpt_path {ckpt_path}")
            super()._parse_ckpt_path()
        except UnsafeRecipeError:
            raise
        except Exception as error:
            raise RecipeError(
                f"--ckpt_path: cannot read checkpoint {ckpt_path}: {type(error).__name__}: {error}"
            ) from error

    def _check_checkpoint(self, subcommand: str) -> None:
        """Refuse a ``--ckpt_path`` that cannot be read safely or was written for another model, in one line
        (Lightning would show a deep traceback)."""
        ckpt_path = self.config[subcommand].get("ckpt_path")
        callback = self.trainer.checkpoint_callback
        if ckpt_path == "last" and callback is not None and callback.dirpath is not None:
            ckpt_path = Path(callback.dirpath) / "last.ckpt"
            if not ckpt_path.is_file():
                return  # Lightning starts afresh and says so
        if ckpt_path in (None, "best", "last", "hpc", "registry"):
            return
        from visionzoo.checkpoints import read_checkpoint

        try:
            checkpoint = read_checkpoint(ckpt_path)
        except (FileNotFoundError, ValueError) as error:
            raise RecipeError(f"--ckpt_path: {error}") from error
        if not isinstance(checkpoint.get("state_dict"), dict):
            raise RecipeError(f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no state_dict)")
        ours, theirs = self.model.state_dict(), checkpoint["state_dict"]
        missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        resized = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
        if missing or unexpected or resized:
            raise RecipeError(
                f"--ckpt_path {ckpt_path} was written for another model: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(resized)} of another "
                f"shape {resized[:3]}"
            )

    def before_fit(self) -> None:
        self._check_checkpoint("fit")

    def before_validate(self) -> None:
        self._check_checkpoint("validate")

    def before_test(self) -> None:
        self._check_checkpoint("test")

    def before_predict(self) -> None:
        self._check_checkpoint("predict")

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        try:  # visionzoo's data modules say clearly when a split is missing
            self.datamodule.dataset("test")
        except (ValueError, FileNotFoundError) as missing:
            print(f"not testing after fit: {missing}")
            return
        checkpoint = self.trainer.checkpoint_callback
        best = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


def run_cli(args: list[str]) -> int:
    """Run ``visionzoo SUBCOMMAND ...`` (``args`` starts with the subcommand)."""
    warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended", UserWarning)  # `main` passes argv
    try:
        VisionZooCLI(
            allow_any_class_path=ALLOW_ANY_FLAG in args,
            args=[a for a in args if a != ALLOW_ANY_FLAG],
            model_class=None,
            datamodule_class=None,
            parser_kwargs={"prog": "visionzoo"},
            parser_class=RecipeArgumentParser,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except (RecipeError, UnsafeRecipeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0
