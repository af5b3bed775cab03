"""A run SIGKILLed mid-way and resumed ends with exactly the weights of an uninterrupted run (CPU)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


pytestmark = pytest.mark.usefixtures("free_disk")


def _train_cmd(data: Path, work_dir: Path, *extra: str):
    return [sys.executable, "-m", "isa", "train", "--model", MODEL, "--data", str(data), "--weights", "none",
            "--iters", "4", "--crop-size", "64", "64", "--batch-size", "2", "--device", "cpu", "--threads", "1",
            "--checkpoint-interval", "2", "--eval-interval", "4", "--log-interval", "1", "--seed", "3",
            "--no-progress", "--work-dir", str(work_dir), *extra]


def _train_records(work_dir: Path):
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_sigkill_then_resume_gives_the_uninterrupted_weights_bit_for_bit(tmp_path, child_env):
    data = make_synthetic_dataset(tmp_path / "data", num_train=6, num_val=1, size_hw=(72, 80))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # the reference run and the run that dies run side by side (one thread each)
    reference = subprocess.Popen(_train_cmd(data, straight), env=child_env(), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # killed after iteration 4's checkpoint is written to its temporary file, before the rename:
    # iterations 3-4 and their log lines are lost, iter_2.pt is the newest complete checkpoint
    killed = subprocess.run(_train_cmd(data, crashed), env=child_env(ISA_TRAIN_KILL_AT="write:4"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert "iter_2.pt" in names and "iter_4.pt" not in names
    assert any(n.startswith(".iter_4.pt.tmp-") for n in names)  # the killed writer's temporary file
    assert not (crashed / "model.safetensors").exists()
    assert any(r["iter"] == 4 for r in _train_records(crashed))  # the lost iterations had been logged
    # a corrupt newer checkpoint (e.g. a truncated copy) must be skipped with a warning
    (crashed / "checkpoints" / "iter_3.pt").write_bytes((crashed / "checkpoints" / "iter_2.pt").read_bytes()[:4096])

    resumed = subprocess.run(_train_cmd(data, crashed, "--resume"), env=child_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "iter_3.pt" in resumed.stderr and "corrupt" in resumed.stderr
    assert "resumed from" in resumed.stderr and "iter_2.pt" in resumed.stderr
    assert "taking over" in resumed.stderr  # the killed run's work-dir lock
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # the log of the resumed run has each iteration once, with the uninterrupted run's values
    rec_a, rec_b = _train_records(straight), _train_records(crashed)
    assert [(r["mode"], r["iter"]) for r in rec_b] == [(r["mode"], r["iter"]) for r in rec_a]
    for ra, rb in zip(rec_a, rec_b):
        if ra["mode"] == "train":
            assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
        else:
            assert ra["mIoU"] == rb["mIoU"]
    assert (crashed / "curves.png").is_file()
    assert not any(p.name.startswith(".") for p in (crashed / "checkpoints").iterdir())  # temporaries cleaned


def _same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("where, stopped_after", [
    pytest.param("iter:3", 3, id="mid-iteration"),
    pytest.param("write:2", 2, id="during-a-checkpoint-write", marks=pytest.mark.slow),
])
def test_ctrl_c_stops_cleanly_and_resume_gives_the_uninterrupted_weights(tmp_path, child_env, where, stopped_after):
    """SIGINT: the step (or the checkpoint write) completes, a checkpoint of it is written, exit 130 with the
    resume command and no traceback, no temporary file; --resume then ends bit-identical to a straight run.
    (test_train_exact_resume stops in every part of an iteration and compares optimizer and log too.)"""
    data = make_synthetic_dataset(tmp_path / "data", num_train=6, num_val=1, size_hw=(72, 80))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = subprocess.Popen(_train_cmd(data, straight), env=child_env(), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run(_train_cmd(data, stopped), env=child_env(ISA_TRAIN_INTERRUPT_AT=where), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 130, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert f"after iteration {stopped_after}" in run.stderr and "--resume" in run.stderr.splitlines()[-1]
    names = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert f"iter_{stopped_after}.pt" in names and not any(n.startswith(".") for n in names)
    assert not (stopped / ".lock").exists()  # released on the way out

    resumed = subprocess.run(_train_cmd(data, stopped, "--resume"), env=child_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    _same_weights(straight, stopped)
