"""`isa check-data`: each classic mistake is found, named with its file and value; metadata that contradicts
itself is a named error; the early-stop count."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from eval.checks import check_dataset
from isa.cli import main
from train.engine import evaluations_without_improvement
from train.synthetic import make_synthetic_dataset


@pytest.fixture
def data(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", num_train=3, num_val=2, size_hw=(40, 48))
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "square", "disc", "unused"]}))
    return root


def test_a_clean_dataset_has_a_table_and_no_errors(data, capsys):
    report = check_dataset(data)
    assert report.ok and [s.name for s in report.splits] == ["train", "val"]
    assert sum(report.splits[0].pixels.values()) == 3 * 40 * 48
    assert any("'unused'" in w for w in report.warnings)  # a class with no pixel in train
    assert main(["check-data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "square" in out and "no errors" in out


def test_each_mistake_is_an_error_naming_the_file_and_the_value(data, capsys):
    (data / "masks/train/img_000.png").unlink()  # an image without a mask
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(data / "masks/train/img_001.png")  # size
    mask = np.asarray(Image.open(data / "masks/val/img_000.png")).copy()
    mask[:3, :5] = 7  # 15 pixels of a value that is no class
    Image.fromarray(mask).save(data / "masks/val/img_000.png")
    (data / "images/val/img_001.png").write_bytes(b"not a png")  # corrupt
    Image.fromarray(mask).save(data / "masks/val/orphan.png")  # a mask without an image
    report = check_dataset(data)
    text = "\n".join(report.errors)
    assert not report.ok
    assert "without a mask" in text and "img_000.png" in text
    assert "img_001.png is 40x48" in text and "40x50" in text
    assert "value 7 (15 pixels)" in text and "img_000.png" in text
    assert "cannot read image" in text and "img_001.png" in text
    assert any("orphan.png" in w for w in report.warnings)
    assert main(["check-data", str(data)]) == 1
    assert "error:" in capsys.readouterr().out


def test_an_empty_split_a_crop_larger_than_every_image_and_a_jpeg_mask_are_named(data):
    for name in (data / "images" / "val").iterdir():
        name.unlink()
    report = check_dataset(data, crop_size=(64, 64))
    assert any("val: the split is empty" in e and "images/val" in e for e in report.errors), report.errors
    assert any("crop 64x64" in w and "largest is 40x48" in w for w in report.warnings), report.warnings
    assert not any("the crop" in w for w in check_dataset(data, crop_size=(32, 32)).warnings)
    mask = data / "masks" / "train" / "img_000.png"
    Image.open(mask).save(mask.with_suffix(".jpg"), quality=95)  # labels saved as a JPEG beside a JPEG photo
    mask.unlink()
    text = "\n".join(check_dataset(data).errors)
    assert "without a mask" not in text
    assert "img_000.jpg is a lossy JPEG image" in text


def test_mostly_ignored_splits_are_warned_about(data):
    for path in (data / "masks/val").iterdir():
        Image.fromarray(np.full((40, 48), 255, dtype=np.uint8)).save(path)
    assert any("val: 100.0% of the pixels are ignored" in w for w in check_dataset(data).warnings)


def test_metadata_that_contradicts_the_tensors_or_itself_is_a_named_error(tmp_path):
    import zoo
    from zoo.metadata import MetadataError, ModelMeta
    from zoo.reader import read_metadata
    from zoo.weights import save_weights

    model = zoo.create_model("isanet_r50-d8_512x512_20k_voc12aug", num_classes=3)
    path = save_weights(model.state_dict(), tmp_path / "m.safetensors", model.meta)
    meta = read_metadata(path)
    tensors = load_file(str(path))
    five = {**meta, "num_classes": "5", "classes": json.dumps(list("abcde")), "palette": json.dumps([[0, 0, 0]] * 5)}
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata=five)
    with pytest.raises(MetadataError, match="num_classes=5 but the classifier"):
        zoo.create_model(weights=tmp_path / "k.safetensors")
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={**meta, "classes": '["a", "b"]'})
    with pytest.raises(MetadataError, match="'classes' lists 2 names but num_classes is 3"):
        zoo.create_model(weights=tmp_path / "c.safetensors")
    save_file(tensors, str(tmp_path / "v.safetensors"), metadata={**meta, "variant": "isanet_r18"})
    with pytest.raises(MetadataError, match="'variant' 'isanet_r18' is not a known model"):
        zoo.create_model(weights=tmp_path / "v.safetensors")
    with pytest.raises(MetadataError, match="ignore_index 1 is also a class index"):
        ModelMeta.for_variant(zoo.get_config("isanet_r50-d8_512x512_20k_voc12aug"), 3, ignore_index=1)
    bare = tmp_path / "bare.safetensors"  # another tool's file: no metadata, loads when the name is given
    save_file(tensors, str(bare))
    assert zoo.create_model("isanet_r50-d8_512x512_20k_voc12aug", weights=bare, num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="does not say which variant"):
        zoo.create_model(weights=bare)
    assert torch.equal(zoo.create_model(weights=path).state_dict()["decode_head.conv_seg.weight"],
                       model.state_dict()["decode_head.conv_seg.weight"])


@pytest.mark.parametrize("scores, since", [([], 0), ([1.0], 0), ([1.0, 2.0, 1.5], 1), ([3.0, 1.0, 2.0, 3.0], 3),
                                           ([None, 1.0, None], 1)])
def test_evaluations_without_improvement(scores, since):
    assert evaluations_without_improvement([{"mIoU": s} for s in scores]) == since


def test_reduce_zero_label_is_applied_before_values_are_checked_and_counted(tmp_path):
    # stored 0 -> ignored, 1 -> class 0, 2 -> class 1 (as SegDataset.load_mask); stored 3 would be class 2: no class
    root = tmp_path / "rz"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(root / "images" / split / "a.png")
        mask = np.array([[0] * 5, [1] * 5, [2] * 5, [2] * 5], dtype=np.uint8)
        Image.fromarray(mask).save(root / "masks" / split / "a.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["cat", "dog"], "reduce_zero_label": True}))
    report = check_dataset(root)
    assert report.ok, report.errors
    assert report.splits[0].pixels == {255: 5, 0: 5, 1: 10}  # class indices, by hand
    bad = np.array([[0] * 5, [1] * 5, [2] * 5, [3, 3, 2, 2, 2]], dtype=np.uint8)
    Image.fromarray(bad).save(root / "masks" / "val" / "a.png")
    text = "\n".join(check_dataset(root).errors)
    assert "val: value 3 (2 pixels)" in text and "reduce_zero_label" in text and "a.png" in text
