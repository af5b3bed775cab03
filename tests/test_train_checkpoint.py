"""Checkpoint files: atomic writes, weights_only loading, corrupt-newest fallback, the curves PNG."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint as ckpt
from train.plot import plot_curves, read_log


def _state(value):
    return {"model": {"w": torch.full((3,), float(value))}, "optimizer": {"state": {}, "param_groups": []},
            "rng": [{"torch": torch.get_rng_state()}], "data": {"epoch": 1, "offset": 2},
            "config": {"crop_size_hw": [64, 64], "amp": None}, "history": [{"iter": 2, "mIoU": 1.5}]}


def test_save_is_atomic_and_loads_with_weights_only(tmp_path):
    path = ckpt.save_checkpoint(_state(1), tmp_path, 2)
    assert path == tmp_path / "checkpoints" / "iter_2.pt"
    assert [p.name for p in path.parent.iterdir()] == ["iter_2.pt"]  # no temporary left behind
    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert state["iteration"] == 2 and state["format"] == ckpt.FORMAT
    assert torch.equal(state["rng"][0]["torch"], torch.get_rng_state())


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    ckpt.save_checkpoint(_state(1), tmp_path, 2)
    newest = ckpt.save_checkpoint(_state(2), tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as after a crash on a non-atomic FS
    (tmp_path / "checkpoints" / ".iter_6.pt.tmp-123").write_bytes(b"partial")  # a killed writer's temp file
    with pytest.warns(RuntimeWarning, match="iter_4.pt"):
        state, path = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "iter_2.pt" and state["model"]["w"][0].item() == 1.0


def test_listing_is_newest_first_by_iteration_number(tmp_path):
    for it in (2, 10, 4):
        ckpt.save_checkpoint(_state(it), tmp_path, it)
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [10, 4, 2]
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [10, 4]


def test_pruning_after_a_fallback_resume_keeps_the_new_checkpoint_and_the_one_resumed_from(tmp_path):
    # iter_6 is unreadable, so a resume falls back to iter_2 and then writes iter_4: counting iter_6 among the
    # kept ones would delete iter_4 (keep 1) or iter_2 (keep 2) - the only good checkpoints
    for it in (2, 4):
        ckpt.save_checkpoint(_state(it), tmp_path, it)
    (ckpt.checkpoint_dir(tmp_path) / "iter_6.pt").write_bytes(b"truncated")
    ckpt.prune_checkpoints(tmp_path, keep=2, current=4)
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [6, 4, 2]
    ckpt.prune_checkpoints(tmp_path, keep=1, current=4)
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [6, 4]


def test_a_pickle_with_code_or_a_foreign_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "iteration": 1, "model": {}, "x": Evil()}, bad)
    with pytest.raises(ValueError, match="cannot be read"):
        ckpt.load_checkpoint(bad)
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="--weights"):
        ckpt.load_checkpoint(other)


def test_rng_state_round_trip():
    state = ckpt.rng_state(torch.device("cpu"))
    a = torch.rand(3)
    ckpt.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)


def test_curves_png_draws_loss_and_miou(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"mode": "train", "iter": i, "loss": 2.0 / i} for i in range(1, 21)]
    records += [{"mode": "val", "iter": 10, "mIoU": 20.0}, {"mode": "val", "iter": 20, "mIoU": 35.0}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"half-written")
    assert len(read_log(log)) == 22
    out = tmp_path / "curves.png"
    plot_curves(read_log(log), out)
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(pixels, axis=0)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # the loss and the mIoU lines


def test_resume_skips_a_checkpoint_with_non_finite_weights_naming_the_tensor(tmp_path):
    good = {"model": {"w": torch.ones(2)}, "config": {}}
    ckpt.save_checkpoint(good, tmp_path, 2)
    ckpt.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "config": {}}, tmp_path, 4)
    with pytest.warns(RuntimeWarning, match="'w' has 1 NaN"):
        state, path = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "iter_2.pt" and state["iteration"] == 2
