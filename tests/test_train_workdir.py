"""A work dir is never silently reused, and a run with the CLI's defaults keeps its disk use bounded.

One 40-iteration run with `isa train`'s default flags (tiny shapes) is the earlier run of every check:
it leaves at most 3 checkpoint files; a second `isa train` into its work dir fails before any work and
names the three choices; `--resume` with another crop size is refused naming the field; `--overwrite`
moves every old output to WORK_DIR/previous-<time>/ byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isa.training import add_arguments, config_from_args
from train import train
from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "isanet_r50-d8_512x512_20k_voc12aug"

pytestmark = pytest.mark.usefixtures("free_disk")


def _argv(data: Path, work: Path, *extra: str):
    # the CLI's defaults but for what keeps the run tiny
    return ["--model", MODEL, "--data", str(data), "--weights", "none", "--iters", "40", "--crop-size", "32", "32",
            "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress", "--work-dir", str(work),
            *extra]


def _config(*argv: str):
    return config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


def _digests(folder: Path):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def test_a_used_work_dir_is_refused_kept_on_overwrite_and_resume_refuses_a_changed_crop(tmp_path, child_env):
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=1, size_hw=(40, 48))
    work = tmp_path / "run"
    result = train(_config(*_argv(data, work)))
    assert result["iterations"] == 40
    checkpoint_files = sorted(p.name for p in (work / "checkpoints").iterdir()) + ["best.safetensors"]
    assert (work / "best.safetensors").is_file() and len(checkpoint_files) <= 3, checkpoint_files
    before = _digests(work)

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "isa", "train", *_argv(data, work)], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    for word in ("--resume", "--work-dir", "--overwrite", "config.json", "checkpoints/", "iter_40.pt"):
        assert word in message, message
    assert "Traceback" not in proc.stderr and "data checks" not in proc.stderr  # refused before any work
    assert elapsed < 60, elapsed  # interpreter start-up and imports, no training
    assert _digests(work) == before  # nothing touched

    with pytest.raises(ValueError, match=r"crop_size: \[32, 32\] -> \[48, 48\]"):
        train(_config(*_argv(data, work, "--resume", "--crop-size", "48", "48")))
    assert _digests(work) == before

    again = train(_config(*_argv(data, work, "--overwrite", "--iters", "1")))
    assert again["iterations"] == 1
    moved = [p for p in work.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1 and _digests(moved[0]) == before  # every old output, byte for byte
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["iter_1.pt"]


def test_overwrite_moves_only_the_runs_outputs_not_the_users_files(tmp_path):
    # --work-dir . beside the dataset: --overwrite must not carry the data (or anything else of the user's) away
    from train.engine import move_aside, previous_outputs

    work = tmp_path
    for name, text in (("config.json", "{}"), ("log.jsonl", ""), ("best.safetensors", "b"),
                       ("checkpoints/iter_4.pt", "c"), ("tensorboard/events", "t"),
                       ("my_data/images/train/a.png", "img"), ("notes.txt", "mine"), (".lock", "{}")):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    assert previous_outputs(work)
    moved = move_aside(work)
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file()) == [
        "best.safetensors", "checkpoints/iter_4.pt", "config.json", "log.jsonl", "tensorboard/events"]
    assert (work / "my_data/images/train/a.png").read_text() == "img"
    assert (work / "notes.txt").read_text() == "mine" and (work / ".lock").is_file()
    assert previous_outputs(work) == []


def test_resume_without_a_readable_checkpoint_refuses_a_used_work_dir_and_starts_an_empty_one(tmp_path, caplog):
    # a killed run's outputs with only a truncated checkpoint: "starting from scratch" here used to delete log.jsonl
    # and then replace best.safetensors and config.json
    from train.engine import WorkDirInUse

    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, size_hw=(40, 48))
    work = tmp_path / "run"
    for name, text in (("config.json", "{}"), ("log.jsonl", '{"mode": "train", "iter": 4}\n'),
                       ("best.safetensors", "best"), ("checkpoints/iter_4.pt", "truncated")):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    before = _digests(work)
    with pytest.raises(WorkDirInUse) as refused:
        train(_config(*_argv(data, work, "--resume", "--iters", "1")))
    for word in ("no complete readable checkpoint", "log.jsonl", "best.safetensors", "config.json", "iter_4.pt",
                 "--work-dir", "--overwrite"):
        assert word in str(refused.value), str(refused.value)
    assert _digests(work) == before  # nothing lost

    fresh = tmp_path / "new"  # nothing to lose: --resume starts a new run, saying so in one line
    with caplog.at_level("WARNING", logger="train.engine"):
        result = train(_config(*_argv(data, fresh, "--resume", "--iters", "1")))
    assert result["iterations"] == 1
    said = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    assert len(said) == 1 and "starting a new run" in said[0], said
