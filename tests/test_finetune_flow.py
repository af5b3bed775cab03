"""A user's loop: check the data, fine-tune on a folder dataset, then use the result by its file alone."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from isa.cli import main
from train import finetune
from train.synthetic import make_synthetic_dataset
from zoo import Segmenter
from zoo.reader import read_metadata

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"
CLASSES = ["background", "square", "disc"]
PALETTE = [[0, 0, 0], [220, 60, 40], [40, 90, 220]]

pytestmark = pytest.mark.usefixtures("free_disk")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class folder dataset and a short fine-tuning run on it (random init: the flow, not the accuracy)."""
    root = tmp_path_factory.mktemp("flow")
    data = make_synthetic_dataset(root / "data", num_train=4, num_val=2, size_hw=(48, 64))
    (data / "dataset.json").write_text(json.dumps({"classes": CLASSES, "palette": PALETTE}))
    result = finetune(MODEL, str(data), str(root / "run"), iters=3, crop_size=(32, 32), batch_size=2, weights=None,
                      device="cpu", eval_interval=1, progress=False)
    return data, root / "run", result


def test_training_writes_best_weights_and_the_resolved_config(trained):
    data, run, result = trained
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == MODEL and config["crop_size"] == [32, 32] and config["classes"] == CLASSES
    assert config["eval_scale"] == [128, 32] and config["train_images"] == 4
    best = result["best"]
    assert best is not None and best["mIoU"] == max(m["mIoU"] for m in result["history"])
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged if r.get("best")][-1] == best["iter"]
    meta = read_metadata(result["best_weights"])
    assert int(meta["best_iter"]) == best["iter"] and float(meta["best_mIoU"]) == pytest.approx(best["mIoU"])
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["test_scale_wh"]) == [128, 32]


def test_the_weights_file_alone_predicts_with_the_dataset_class_names(trained, tmp_path):
    data, run, result = trained
    seg = Segmenter(weights=result["weights"], device="cpu")  # no variant name, no class count
    assert list(seg.classes) == CLASSES and [list(c) for c in seg.palette] == PALETTE
    image = np.asarray(Image.open(sorted((data / "images/val").iterdir())[0]))
    labels = seg(image)
    assert labels.shape == image.shape[:2] and int(labels.max()) < 3
    out = tmp_path / "pred"
    assert main(["predict", "--weights", result["weights"], str(data / "images/val"), "--out-dir", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    overlay = np.asarray(Image.open(out / "img_000_overlay.png"))
    mask = np.asarray(Image.open(out / "img_000_mask.png"))
    legend = overlay[:, 64:]
    for c in np.unique(mask):  # the legend shows each predicted class in its dataset.json colour
        assert (legend == np.array(PALETTE[c], dtype=np.uint8)).all(-1).any()


def test_eval_of_the_weights_uses_the_scale_the_run_validated_with(trained, capsys):
    data, run, result = trained
    assert main(["eval", "--weights", result["weights"], "--workers", "0", "--no-progress", "--device", "cpu",
                 "--out", str(run / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "recorded in the weights" in printed and "scale (128, 32)" in printed
    evaluated = json.loads((run / "eval.json").read_text())["mIoU"]
    assert evaluated == pytest.approx(result["metrics"]["mIoU"], abs=0.5)  # BN folding: rounding only


def test_binary_0_255_masks_fail_training_with_the_file_and_the_fix_and_train_with_a_label_map(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, size_hw=(40, 48))
    for path in data.glob("masks/*/*.png"):
        mask = np.asarray(Image.open(path))
        Image.fromarray(np.where((mask > 0) & (mask < 255), 255, 0).astype(np.uint8)).save(path)
    (data / "dataset.json").write_text(json.dumps({"classes": ["background", "object"]}))
    cmd = ["train", "--model", MODEL, "--data", str(data), "--weights", "none", "--iters", "1", "--crop-size", "32",
           "32", "--batch-size", "2", "--device", "cpu", "--no-progress", "--work-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "isa", *cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "img_000.png" in proc.stderr and "0 and 255" in proc.stderr and '"label_map": {"255": 1}' in proc.stderr
    assert "Traceback" not in proc.stderr
    (data / "dataset.json").write_text(json.dumps({"classes": ["background", "object"], "label_map": {"255": 1}}))
    proc = subprocess.run([sys.executable, "-m", "isa", *cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = proc.stderr[proc.stderr.index("data checks"):]
    object_row = next(line for line in table.splitlines() if line.startswith("object"))
    assert float(object_row.split()[1].rstrip("%")) > 0  # the foreground is a class now, with pixels
    assert torch.load(tmp_path / "run/checkpoints/iter_1.pt", weights_only=True)["iteration"] == 1
