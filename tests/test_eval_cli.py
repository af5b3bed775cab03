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
