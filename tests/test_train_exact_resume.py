"""Ctrl-C at any point of an iteration, then --resume: the run ends exactly as an uninterrupted one.

One run is stopped three times by SIGINT (delivered to this process by `train.checkpoint.fault_point`)
and resumed after each stop: during the training step of an iteration that evaluates (the stop comes
before that evaluation, which the resumed run makes up), during an evaluation (abandoned, made up) and
during a checkpoint write (completed, then the stop). Weights, optimizer state, the checkpoint's RNG
and history and log.jsonl (but its timings) must equal those of a straight run bit for bit. The runs
are in-process (the library API) so that the test stays cheap: 16 tiny iterations in all.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import TrainConfig, TrainingInterrupted, train
from train import checkpoint as ckpt
from train.synthetic import make_synthetic_dataset

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"
evaluate_module = importlib.import_module("eval.evaluate")  # the package exports a function of that name
TIMINGS = ("time", "data_time", "memory_mb", "eta_s")

pytestmark = pytest.mark.usefixtures("free_disk")


def _config(data: Path, work: Path, **extra) -> TrainConfig:
    return TrainConfig.for_finetune(MODEL, str(data), work_dir=str(work), weights=None, iters=6, crop_size=(32, 32),
                                    batch_size=2, device="cpu", threads=1, eval_interval=2, checkpoint_interval=3,
                                    log_interval=2, seed=5, progress=False, check_data=False,
                                    **extra)


def _log(work: Path):
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def _interrupting(predict):
    calls = []

    def predict_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return predict(*args, **kwargs)

    return predict_then_interrupt


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sigint_in_a_step_an_evaluation_and_a_checkpoint_write_then_resume_is_exact(tmp_path, monkeypatch,
                                                                                 torch_threads):
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=1, size_hw=(40, 48))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    monkeypatch.delenv("ISA_TRAIN_INTERRUPT_AT", raising=False)
    want = train(_config(data, straight))

    # iteration 2 evaluates: the stop lands in its training step, before the evaluation
    stops = [("iter:2", 2), ("write:3", 3), ("mid-evaluation", 4)]
    for where, iteration in stops:
        with monkeypatch.context() as patch:
            if where == "mid-evaluation":
                # Ctrl-C after the evaluation's data loader has started (it has drawn its seed) and the first
                # image is read: the evaluation of iteration 4, the first one of the run resumed at 3
                patch.delenv("ISA_TRAIN_INTERRUPT_AT", raising=False)
                patch.setattr(evaluate_module, "view_logits", _interrupting(evaluate_module.view_logits))
            else:
                patch.setenv("ISA_TRAIN_INTERRUPT_AT", where)
            with pytest.raises(TrainingInterrupted) as info:
                train(_config(data, stopped, resume=where != "iter:2"))
        assert info.value.iteration == iteration and info.value.checkpoint == ckpt.checkpoint_path(stopped, iteration)
        state = ckpt.load_checkpoint(info.value.checkpoint)
        # a stop before or during an evaluation leaves it to the resumed run
        assert state["pending_eval"] == (where != "write:3")
        assert [m["iter"] for m in state["history"]] == ([] if where == "iter:2" else [2])
    got = train(_config(data, stopped, resume=True))

    assert got["iterations"] == want["iterations"] == 6
    a, b = load_file(want["weights"]), load_file(got["weights"])
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    sa = ckpt.load_checkpoint(ckpt.checkpoint_path(straight, 6))
    sb = ckpt.load_checkpoint(ckpt.checkpoint_path(stopped, 6))
    for name, pa in sa["optimizer"]["state"].items():
        assert torch.equal(pa["momentum_buffer"], sb["optimizer"]["state"][name]["momentum_buffer"])
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert sa["history"] == sb["history"] and [m["iter"] for m in sa["history"]] == [2, 4, 6]
    assert _log(straight) == _log(stopped)
    assert got["best"] == want["best"]
    # the default keeps the 2 newest checkpoints (the stopped run wrote iter_2, 3, 4 and 6)
    for work in (straight, stopped):
        assert [i for i, _ in ckpt.list_checkpoints(work)] == [6, 4 if work == stopped else 3]
    assert load_file(want["best_weights"]).keys() == load_file(got["best_weights"]).keys()
    best_a, best_b = load_file(want["best_weights"]), load_file(got["best_weights"])
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
