"""Every packaged recipe runs ``visionzoo fit`` (fast_dev_run) on a tiny dataset written in its own on-disk
format; the CLI's links, overrides, checkpoints, resume and export from a fit checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

import visionzoo
from visionzoo.checkpoints import load_model
from visionzoo.cli import main
from visionzoo.data.scenes import SceneSpec, write_fashion_scenes
from visionzoo.heads import create_segmenter

from tiny_datasets import write_ade20k, write_coco, write_garments_idx, write_idx, write_imagefolder

RECIPES = visionzoo.list_recipes()
CPU_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]


def recipe_path(name: str) -> Path:
    with resources.as_file(resources.files("visionzoo.recipes") / name) as path:
        return Path(path)


def _tiny_data(data: dict, tmp: Path) -> dict:
    """The recipe's data section pointed at a generated dataset of the same format."""
    args = data["init_args"]
    kind = data["class_path"].rsplit(".", 1)[-1]
    if "fashion-scenes" in args["root"]:  # the quickstarts' data, from Fashion-MNIST-like files
        args["root"] = str(tmp / "scenes")
        counts, spec = dict(train=4, val=2, test=2), SceneSpec(64, garment_size=(20, 32))
        write_fashion_scenes(write_garments_idx(tmp / "garments"), args["root"], counts=counts, spec=spec)
    elif kind == "ClassificationData" and args.get("format") == "idx":
        args["root"] = str(write_idx(tmp / "idx", train=40, test=8))
    elif kind == "ClassificationData":
        args["root"] = str(write_imagefolder(tmp / "folder", num_classes=3, per_class=2, size=(48, 40)))
    elif kind == "DetectionData":
        args.update(write_coco(tmp / "coco", images=3, with_masks=args.get("with_masks", False)))
    elif kind == "SegmentationData":
        args["root"] = str(write_ade20k(tmp / "ade", images=2))
        for transform in args.get("train_transforms", []) + args.get("eval_transforms", []):
            for key, value in transform.items():  # ADE20K's 512x512 crops (2048 long side) scaled to 64x64
                if key != "name" and isinstance(value, int) and value >= 512:
                    transform[key] = value // 8
    else:  # pragma: no cover - a new data module needs its generator here
        raise AssertionError(f"no tiny dataset for {kind}")
    args.update(batch_size=2, num_workers=0)
    return data


def _offline_small(model: dict) -> dict:
    """No downloads, and detector input sizes a CPU test can afford."""
    args = model["init_args"]
    for key in ("detector_kwargs", "segmenter_kwargs"):
        if key in args:
            args[key].setdefault("backbone_kwargs", {})["pretrained"] = False
    if "detector_kwargs" in args:
        args["detector_kwargs"].update(min_size=96, max_size=128)
    if args.get("pretrained"):
        args["pretrained"] = False
    if args.get("teacher_checkpoint"):  # the quickstart's run: its architecture, untrained
        teacher = yaml.safe_load(recipe_path("classification/quickstart.yaml").read_text())["model"]["init_args"]
        args.update(teacher=teacher["model_name"], teacher_checkpoint=None)
        args["teacher_kwargs"] = {**teacher["model_kwargs"], "num_classes": 10}
    return model


# The paper recipes build full-size models (10-45 s each on 2 cores): `make test-slow` runs them, CI does.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if "quickstart" in n else pytest.mark.slow) for n in RECIPES]
)
def test_recipe_runs_fast_dev_run_on_data_of_its_format(name, tmp_path, monkeypatch):
    config = yaml.safe_load(recipe_path(name).read_text())
    config["data"] = _tiny_data(config["data"], tmp_path)
    config["model"] = _offline_small(config["model"])
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    assert main(["fit", "--config", str(path), "--trainer.fast_dev_run=true", *CPU_TRAINER]) == 0


def test_every_recipe_documents_itself_and_states_its_schedule():
    for name in RECIPES:
        text = recipe_path(name).read_text()
        assert text.startswith("# "), f"{name} starts with no description"
        config = yaml.safe_load(text)
        assert {"model", "data", "trainer"} <= set(config), name
        trainer = config["trainer"]
        assert "max_epochs" in trainer or "max_steps" in trainer, name


def test_segmentation_recipes_synchronise_batchnorm_across_their_devices():
    """mmsegmentation trains its decoders with SyncBN: a recipe on several devices whose decoder has BatchNorm
    must set ``sync_batchnorm`` (Lightning then converts every BatchNorm to SyncBatchNorm)."""
    checked = 0
    for name in RECIPES:
        config = yaml.safe_load(recipe_path(name).read_text())
        args, trainer = config["model"]["init_args"], config["trainer"]
        if "decoder" not in args or trainer.get("devices", 1) in (1, "1"):
            continue
        decoder = create_segmenter(args["decoder"], "resnet18", 4, aux_head=False, channels=16).decoder
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in decoder.modules()):
            assert trainer.get("sync_batchnorm") is True, f"{name}: BatchNorm per device of {trainer['devices']}"
            checked += 1
    assert checked == 2, "the ADE20K recipes were not checked"


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), train=64, test=16)


def _quickstart(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(recipe_path("classification/quickstart.yaml")),
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=16",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
        *CPU_TRAINER,
        *extra,
    ]


def test_fit_writes_checkpoints_logs_curves_and_pictures_then_exports(fashion_like, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", *_quickstart(fashion_like, run, "--trainer.max_epochs=1")]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert list(run.glob("logs/version_0/events.out.tfevents.*")), "TensorBoard log missing"
    assert (run / "logs" / "version_0" / "learning_curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "test/top1" in out, "fit did not test the best checkpoint"
    assert (run / "logs" / "version_0" / "test_predictions.png").stat().st_size > 1000, "no picture of the test"

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 10, "num_classes not linked from the data"
    onnx = tmp_path / "model.onnx"
    code = main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "-o", str(onnx), "--dynamic"])
    assert code == 0 and onnx.is_file()
    out = capsys.readouterr().out
    assert "at 32x32 (batch 2)" in out, f"export did not check the recipe's image size: {out}"
    cfg = load_model(None, run / "checkpoints" / "last.ckpt").pretrained_cfg
    assert (cfg["mean"], cfg["std"]) == ((0.286,) * 3, (0.353,) * 3), "the recipe's normalisation was lost"


def test_resume_from_last_continues_step_and_optimizer_state(fashion_like, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", *_quickstart(fashion_like, run, "--trainer.max_epochs=1", "--test_after_fit=false")]) == 0
    first = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = first["global_step"]
    assert steps_per_epoch > 0

    resumed = _quickstart(fashion_like, run, "--trainer.max_epochs=2", "--test_after_fit=false", "--ckpt_path=last")
    assert main(["fit", *resumed]) == 0
    second = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["global_step"] == 2 * steps_per_epoch, "the resumed run restarted its step count"
    first_state, second_state = first["optimizer_states"][0]["state"], second["optimizer_states"][0]["state"]
    assert second_state[0]["step"] == first_state[0]["step"] + steps_per_epoch, "optimizer state not restored"
    assert second["lr_schedulers"][0]["last_epoch"] == 2 * steps_per_epoch


def test_overrides_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(recipe_path("classification/quickstart.yaml")),
                "--trainer.max_epochs=7",
                "--model.init_args.lr=0.5",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 7
    assert printed["model"]["init_args"]["lr"] == 0.5
    assert "num_classes" not in printed["model"]["init_args"], "num_classes comes from the data"


def test_ddp_on_two_cpu_processes(fashion_like, tmp_path):
    """Two gloo processes through Lightning's launcher, as `visionzoo fit --trainer.strategy=ddp` runs them."""
    run = tmp_path / "run"
    extra = ("--trainer.max_epochs=1", "--data.init_args.batch_size=8", "--trainer.limit_val_batches=1")
    args = _quickstart(fashion_like, run, *extra, "--test_after_fit=false")
    args = [a for a in args if not a.startswith(("--trainer.devices", "--trainer.strategy"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "visionzoo.cli", "fit", *args, "--trainer.devices=2", "--trainer.strategy=ddp"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 61 training images (64 less 3 held out), 31 per process: 3 full batches of 8 (one process: 7)
    assert checkpoint["global_step"] == 3


def test_fsdp_on_cpus_is_refused_in_one_line(fashion_like, tmp_path, capsys):
    """Lightning runs FSDP on CUDA only (the README says so): on CPUs the refusal is one line, before any process
    starts."""
    args = [a for a in _quickstart(fashion_like, tmp_path / "run") if not a.startswith("--trainer.strategy")]
    assert main(["fit", *args, "--trainer.strategy=fsdp"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "The strategy `fsdp` requires a GPU accelerator" in errors[0]


def test_a_recipe_that_cannot_be_built_says_why_in_one_line(tmp_path, capsys):
    quickstart = ["fit", "--config", str(recipe_path("classification/quickstart.yaml"))]
    assert main([*quickstart, f"--data.init_args.root={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "data root" in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "one" / "train" / "only_class").mkdir(parents=True)
    assert main([*quickstart, f"--data.init_args.root={tmp_path / 'one'}", "--data.init_args.format=imagefolder"]) == 2
    assert "at least 2 classes, got 1" in capsys.readouterr().err
