"""Training loses nothing: a run killed mid-epoch resumes from its last checkpoint, checkpoints are written
atomically, and a NaN loss stops the run at the step that produced it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from visionzoo.data import ClassificationData
from visionzoo.tasks import ClassificationTask
from visionzoo.training import AtomicCheckpointIO, NonFiniteLossError, StopOnNonFiniteLoss

from tiny_datasets import write_idx

EMA_DECAY = 0.9
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
    ema = f"--model.init_args.ema_decay={EMA_DECAY}"
    every = "--last_every_n_steps=100"  # the first last.ckpt is mid-epoch, at step 100
    process = subprocess.Popen(_fit_command(root, run, "--trainer.max_epochs=3", ema, every), env=env, cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended (code {process.returncode}) before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = torch.load(last, map_location="cpu", weights_only=True)
    step = killed["global_step"]
    assert step % 100 == 0 and step % 225, f"killed at step {step}: not at a mid-epoch interval checkpoint"
    for path in run.glob("checkpoints/last*.ckpt"):  # what --ckpt_path last may pick: never a partial write
        torch.load(path, map_location="cpu", weights_only=True)

    # one more step, so the EMA's update can be checked exactly: ema' = decay * ema + (1 - decay) * model'
    resume = _fit_command(
        root, run, "--trainer.max_epochs=3", f"--trainer.max_steps={step + 1}", ema, every, "--ckpt_path=last"
    )
    resumed = subprocess.run(resume, env=env, cwd=tmp_path, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dataloader is not resumable" not in resumed.stderr
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == step + 1, "the resumed run did not continue the count"
    assert int(final["optimizer_states"][0]["state"][0]["step"]) == step + 1, "optimizer state was not restored"
    assert final["lr_schedulers"][0]["last_epoch"] == step + 1, "scheduler state was not restored"
    weights = [k.removeprefix("model.") for k in final["state_dict"] if k.startswith("model.")]
    before, after = killed["state_dict"], final["state_dict"]
    assert not torch.equal(before["ema.module." + weights[0]], before["model." + weights[0]])
    for key in weights:
        if after["model." + key].is_floating_point():
            expected = EMA_DECAY * before["ema.module." + key] + (1 - EMA_DECAY) * after["model." + key]
            torch.testing.assert_close(after["ema.module." + key], expected, msg=f"EMA of {key} was not restored")


class _Killed(Exception):
    pass


class _BatchRecorder(pl.Callback):
    """Records each training batch's labels (its images are augmented at random) and stops the run at ``fail_at``
    as a kill would."""

    def __init__(self, fail_at: int | None = None):
        self.batches, self.fail_at = [], fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.fail_at:
            raise _Killed
        self.batches.append(batch[1].tolist())


def test_a_run_resumed_mid_epoch_sees_the_rest_of_the_epochs_order(tmp_path):
    root = write_idx(tmp_path / "idx", train=100, test=8)  # 80 training images: 10 steps an epoch

    def fit(max_steps: int, recorder: _BatchRecorder, run: str, ckpt_path=None) -> list[list[int]]:
        pl.seed_everything(0)
        data = ClassificationData(str(root), format="idx", image_size=32, batch_size=8, val_fraction=0.2)
        task = ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT)
        every_3 = ModelCheckpoint(dirpath=tmp_path / run, save_top_k=0, save_last=True, every_n_train_steps=3)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, every_3],
            plugins=[AtomicCheckpointIO()],
        )  # fmt: skip
        trainer.fit(task, data, ckpt_path=ckpt_path)
        return recorder.batches

    uninterrupted = fit(8, _BatchRecorder(), "uninterrupted")
    killed = _BatchRecorder(fail_at=5)
    with pytest.raises(_Killed):
        fit(8, killed, "killed")
    assert killed.batches == uninterrupted[:5]
    last = tmp_path / "killed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = fit(8, _BatchRecorder(), "resumed", ckpt_path=last)
    assert resumed == uninterrupted[3:], "the resumed run did not continue the epoch's order"


# Saves a checkpoint with half of its bytes written, then waits to be killed: the fault of both writers below.
_HALF_WRITTEN = """
import io, os, sys, time, torch
from visionzoo.training import AtomicCheckpointIO

real_save = torch.save


def save_half_then_hang(obj, file):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    file = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
    file.write(data[: len(data) // 2])
    file.flush()
    print("half written", flush=True)
    time.sleep(600)


torch.save = save_half_then_hang
checkpoint = {"global_step": 2, "weights": torch.ones(512, 512)}
if sys.argv[2] == "atomic":
    AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
else:
    torch.save(checkpoint, sys.argv[1])
"""


def _killed_while_writing(path: Path, writer: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _HALF_WRITTEN, str(path), writer], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "half written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_sigkill_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    previous = {"global_step": 1, "weights": torch.zeros(512, 512)}
    atomic, plain = tmp_path / "atomic" / "last.ckpt", tmp_path / "plain" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(previous, atomic)
    plain.parent.mkdir()
    torch.save(previous, plain)

    _killed_while_writing(atomic, "atomic")
    assert torch.load(atomic, weights_only=True)["global_step"] == 1
    assert len(list(atomic.parent.glob(".last.ckpt.*.partial"))) == 1  # the killed write's, never read
    _killed_while_writing(plain, "plain")  # the same fault without the temporary file: the test can fail
    with pytest.raises(RuntimeError):
        torch.load(plain, weights_only=True)

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, atomic)  # the next save clears the leftover
    assert [p.name for p in atomic.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(atomic, weights_only=True) == {"global_step": 3}


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    real_save = torch.save

    def disk_full(obj, file):  # some bytes reach the file, then the disk is full
        real_save(obj, file)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}, "the previous checkpoint was damaged"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


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


def test_bad_ckpt_path_is_a_one_line_error(tmp_path, capsys):
    from visionzoo.cli import main

    root = write_idx(tmp_path / "idx", train=40, test=8)
    fit = _fit_command(root, tmp_path / "run", "--trainer.max_epochs=1")[3:]  # in this process: `main` args
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"model.stem.weight": torch.zeros(8, 3, 3, 3)}, "epoch": 0}, whole)
    (tmp_path / "truncated.ckpt").write_bytes(whole.read_bytes()[:100])
    torch.save({"state_dict": {}, "hook": print}, tmp_path / "unsafe.ckpt")  # pickled code
    expected = {
        "truncated.ckpt": r"--ckpt_path: cannot read checkpoint .*truncated\.ckpt",
        "unsafe.ckpt": r"--ckpt_path: cannot read checkpoint .*unsafe\.ckpt: .*(Weights only load failed|print)",
        "whole.ckpt": r"--ckpt_path .*whole\.ckpt was written for another model: \d+ missing keys .*, 1 unexpected",
        "missing.ckpt": r"--ckpt_path: no checkpoint at .*missing\.ckpt",
    }
    for name, message in expected.items():
        assert main([*fit, f"--ckpt_path={tmp_path / name}"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(f"error: {message}.*", err, re.S), err
        assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists(), "a refused resume must not start training"


def test_checkpoint_intervals_must_be_positive(tmp_path, capsys):
    from visionzoo.cli import main

    command = _fit_command(write_idx(tmp_path / "idx", train=40, test=8), tmp_path / "run")[3:]
    assert main([*command, "--last_every_n_steps=0"]) == 2
    assert "last_every_n_steps and last_every_minutes must be positive, got 0 and 30.0" in capsys.readouterr().err


def test_pretrained_weights_without_network_is_a_one_line_error(tmp_path, capsys):
    from visionzoo.cli import main

    command = _fit_command(write_idx(tmp_path / "idx", train=40, test=8), tmp_path / "run")[3:]
    url = "http://127.0.0.1:9/visionzoo-unreachable-nat_mini.pth"
    overlay = f"--model.init_args.model_kwargs={{pretrained_cfg_overlay: {{url: '{url}'}}}}"
    assert main([*command, "--model.init_args.model_name=nat_mini", "--model.init_args.pretrained=true", overlay]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot download the pretrained weights from {url}" in err
    assert "model_kwargs: {pretrained_cfg_overlay: {file: PATH}}" in err
