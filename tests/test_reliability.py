"""Training loses nothing: a run killed mid-epoch resumes from its last checkpoint, checkpoints are written
atomically, and a NaN loss stops the run at the step that produced it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from visionzoo.data import ClassificationData, write_idx
from visionzoo.tasks import ClassificationTask
from visionzoo.training import AtomicCheckpointIO, NonFiniteLossError, StopOnNonFiniteLoss

TINY_MIXVIT = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")


def _fit_command(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "visionzoo.cli",
        "fit",
        "--config",
        str(Path(__file__).parents[1] / "recipes" / "classification" / "quickstart.yaml"),
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=8",
        "--data.init_args.val_fraction=0.1",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--test_after_fit=false",
        *extra,
    ]


def test_sigkill_mid_epoch_then_resume_from_last(tmp_path):
    root = write_idx(tmp_path / "idx", train=2000, test=8)  # 1800 train images: 225 steps per epoch
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_fit_command(root, run, "--trainer.max_epochs=3"), env=env, cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next epoch
    assert process.poll() is None, f"the run ended (code {process.returncode}) before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = torch.load(last, map_location="cpu", weights_only=True)
    assert killed["global_step"] in (225, 450), f"killed at step {killed['global_step']}: not mid-run"
    for path in run.glob("checkpoints/last*.ckpt"):  # what --ckpt_path last may pick: never a partial write
        torch.load(path, map_location="cpu", weights_only=True)

    resumed = subprocess.run(
        _fit_command(root, run, "--trainer.max_epochs=3", "--ckpt_path=last"), env=env, cwd=tmp_path, timeout=600
    )
    assert resumed.returncode == 0
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 3 * 225, "the resumed run did not continue the count"
    optimizer_step = final["optimizer_states"][0]["state"][0]["step"]
    assert int(optimizer_step) == 3 * 225, "optimizer state was not restored"
    assert final["lr_schedulers"][0]["last_epoch"] == 3 * 225, "scheduler state was not restored"


def test_checkpoints_are_renamed_into_place(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}, "the previous checkpoint was damaged"


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    root = write_idx(tmp_path / "idx", train=60, test=8)
    data = ClassificationData(str(root), format="idx", image_size=32, batch_size=8, val_fraction=0.2)
    task = ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT)

    def poison(module, inputs, output):  # the loss of the third step is NaN
        return output * float("nan") if module.training and task.global_step == 2 else output

    task.model.register_forward_hook(poison)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, StopOnNonFiniteLoss()],
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(NonFiniteLossError, match=r"at global step 2 .*last good checkpoint: .*last\.ckpt"):
        trainer.fit(task, data)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
