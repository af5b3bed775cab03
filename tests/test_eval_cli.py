"""`isa eval` and `isa predict` end to end on a tiny folder dataset with a randomly initialised R-50 model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from isa.cli import main

MODEL = "isanet_r50-d8_512x1024_40k_cityscapes"
CLASSES = ["ground", "thing", "sky"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 0, 250]]


def make_dataset(root, sizes=((32, 48), (40, 40))):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        (root / "images/val").mkdir(parents=True, exist_ok=True)
        (root / "masks/val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"images/val/im{i}.png")
        mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
        mask[0] = 255
        Image.fromarray(mask).save(root / f"masks/val/im{i}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "palette": PALETTE}))


def miou_from_files(pred_dir, mask_dir, k):
    """Spec §6 from the written PNGs: dataset-level intersect/union sums, NaN-ignoring mean."""
    inter, union = np.zeros(k), np.zeros(k)
    for mask_path in sorted(mask_dir.glob("*.png")):
        label = np.array(Image.open(mask_path)).astype(np.int64)
        pred = np.array(Image.open(pred_dir / mask_path.name)).astype(np.int64)
        keep = label != 255
        p, l = pred[keep], label[keep]
        for c in range(k):
            inter[c] += np.sum((p == c) & (l == c))
            union[c] += np.sum((p == c) | (l == c))
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(np.where(union > 0, inter / union, np.nan)) * 100)


def test_isa_eval_end_to_end_on_a_folder_dataset(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    out, preds = tmp_path / "results.json", tmp_path / "preds"
    code = main(["eval", "--model", MODEL, "--weights", "none", "--data-root", str(tmp_path / "data"),
                 "--dataset", "folder", "--img-scale", "64", "32", "--device", "cpu", "--num-workers", "0",
                 "--out", str(out), "--save-preds", str(preds), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| thing" in printed and "mIoU" in printed
    result = json.loads(out.read_text())
    assert result["classes"] == CLASSES and result["num_images"] == 2 and result["scale_wh"] == [64, 32]
    assert len(result["IoU"]) == 3 and result["published_mIoU"] is None
    pred = Image.open(preds / "im0.png")
    assert pred.mode == "P" and pred.size == (48, 32) and pred.getpalette()[3:6] == PALETTE[1]
    assert result["mIoU"] == pytest.approx(miou_from_files(preds, tmp_path / "data/masks/val", 3), abs=1e-9)


def test_isa_eval_reports_bad_data_with_the_file_name(tmp_path, capsys):
    make_dataset(tmp_path)
    (tmp_path / "masks/val/im1.png").unlink()
    code = main(["eval", "--model", MODEL, "--weights", "none", "--data-root", str(tmp_path), "--dataset", "folder",
                 "--device", "cpu"])
    assert code == 1  # a failure; 2 is for command lines that cannot mean anything
    assert "im1.png has no mask" in capsys.readouterr().err


def test_isa_predict_writes_palette_masks_and_overlays_with_legend(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    code = main(["predict", "--model", MODEL, "--weights", "none", str(tmp_path / "data/images/val"),
                 "--out", str(tmp_path / "out"), "--classes", str(tmp_path / "data/dataset.json"),
                 "--img-scale", "64", "32", "--device", "cpu", "--no-progress"])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["im0_mask.png", "im0_overlay.png", "im1_mask.png", "im1_overlay.png"]
    mask = Image.open(tmp_path / "out/im0_mask.png")
    overlay = Image.open(tmp_path / "out/im0_overlay.png")
    assert mask.mode == "P" and mask.size == (48, 32) and np.array(mask).max() < 3
    assert overlay.mode == "RGB" and overlay.width > 48 and overlay.height >= 32  # legend panel on the right
    legend = np.array(overlay)[:, 48:]
    present = set(np.unique(np.array(mask)).tolist())
    for c in present:  # every class present has its swatch in the legend
        assert (legend == np.array(PALETTE[c], dtype=np.uint8)).all(-1).any()
    assert "wrote 4 files" in capsys.readouterr().out


def test_eval_refuses_weights_whose_classifier_would_be_reinitialised(tmp_path, capsys):
    """Published 19-class weights on a 3-class folder dataset: an error, not a random classifier."""
    import torch
    import zoo
    from zoo.weights import convert_checkpoint

    name = "isanet_r50-d8_512x1024_40k_cityscapes"
    src = tmp_path / "ckpt.pth"
    torch.save({"state_dict": zoo.ISANet(zoo.get_config(name)).state_dict()}, src)
    dst = convert_checkpoint(src, tmp_path / "ckpt.safetensors", name)
    make_dataset(tmp_path / "data")
    code = main(["eval", "--weights", str(dst), "--data", str(tmp_path / "data"), "--device", "cpu",
                 "--test-scale", "64", "32", "--workers", "0", "--no-progress"])
    assert code == 1
    assert "predicts 19 classes" in capsys.readouterr().err


# ------------------------------------------------------------- metrics, files, pictures, batches, torchrun

def _weights_for_3_classes(tmp_path):
    import torch
    import zoo
    from zoo.weights import convert_checkpoint

    torch.manual_seed(0)
    src = tmp_path / "ckpt.pth"
    torch.save({"state_dict": zoo.create_model(MODEL, num_classes=3).state_dict()}, src)
    return convert_checkpoint(src, tmp_path / "w3.safetensors", MODEL, num_classes=3)


def test_isa_eval_writes_metrics_tables_confusion_and_error_pictures(tmp_path, capsys):
    make_dataset(tmp_path / "data", sizes=((32, 48), (32, 48), (40, 40)))
    out = tmp_path / "res" / "results.json"
    code = main(["eval", "--model", MODEL, "--weights", "none", "--data", str(tmp_path / "data"),
                 "--img-scale", "64", "32", "--device", "cpu", "--workers", "0", "--batch-size", "2",
                 "--metrics", "mIoU", "mDice", "mFscore", "--beta", "2", "--save-errors", "2", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Fscore" in printed and "mDice" in printed and "fwIoU" in printed and "most confused" in printed
    result = json.loads(out.read_text())
    assert result["metrics"] == ["mIoU", "mDice", "mFscore"] and result["beta"] == 2.0
    assert {"mDice", "mFscore", "mPrecision", "mRecall", "fwIoU", "Share"} <= set(result)
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "confusion.csv", "confusion.png", "errors", "per_class.csv", "per_image.csv", "results.json"]
    assert len(list((tmp_path / "res/errors").iterdir())) == 2
    header = (tmp_path / "res/per_class.csv").read_text().splitlines()[0]
    assert header.startswith("class,index,IoU,Acc,Dice,Fscore,Precision,Recall,Share")
    assert len((tmp_path / "res/per_image.csv").read_text().splitlines()) == 4
    assert Image.open(tmp_path / "res/confusion.png").mode == "RGB"


def test_isa_eval_refuses_save_errors_without_a_folder(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    code = main(["eval", "--model", MODEL, "--weights", "none", "--data", str(tmp_path / "data"), "--device", "cpu",
                 "--save-errors", "3"])
    assert code == 2 and "--errors-dir" in capsys.readouterr().err


def test_isa_eval_under_torchrun_writes_the_results_of_one_process(tmp_path, child_env):
    """2 gloo processes (each half of the images) vs 1 process: the same results JSON, byte for byte."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    make_dataset(tmp_path / "data", sizes=((32, 48), (40, 40), (32, 48)))
    weights = _weights_for_3_classes(tmp_path)
    common = ["-m", "isa", "eval", "--weights", str(weights), "--data", str(tmp_path / "data"), "--img-scale",
              "64", "32", "--device", "cpu", "--workers", "0", "--batch-size", "2", "--metrics", "mIoU", "mDice",
              "mFscore", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.Popen([*torchrun, *common, "--out", str(tmp_path / "two/results.json")], env=child_env(),
                           cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one/results.json")], env=child_env(),
                         cwd=repo, capture_output=True, text=True, timeout=300)
    log, _ = two.communicate(timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, log
    a = (tmp_path / "one/results.json").read_text()
    b = (tmp_path / "two/results.json").read_text()
    assert json.loads(a)["num_images"] == 3 and len(json.loads(a)["per_image"]) == 3
    assert a == b
    for name in ("per_class.csv", "per_image.csv", "confusion.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert log.count("| thing") == 1  # only rank 0 prints the table


def test_isa_predict_batches_give_the_masks_of_batch_size_one(tmp_path):
    make_dataset(tmp_path / "data", sizes=((32, 48), (32, 48), (32, 48), (40, 40)))
    weights = _weights_for_3_classes(tmp_path)  # the same network both times
    masks = {}
    for batch in ("1", "3"):
        code = main(["predict", "--weights", str(weights), str(tmp_path / "data/images/val"),
                     "--out", str(tmp_path / batch), "--img-scale", "64", "32", "--device", "cpu", "--no-progress",
                     "--batch-size", batch, "--workers", "1" if batch == "3" else "0"])
        assert code == 0
        masks[batch] = {p.name: np.array(Image.open(p)) for p in sorted((tmp_path / batch).glob("*_mask.png"))}
    assert len(masks["1"]) == 4 and masks["1"].keys() == masks["3"].keys()
    for name in masks["1"]:
        assert np.array_equal(masks["1"][name], masks["3"][name]), name
