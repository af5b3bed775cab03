"""Dataset readers on tiny datasets written in each real layout, and every bad-data error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from zoo.classes import ADE20K_CLASSES, CITYSCAPES_PALETTE, VOC_PALETTE
from eval.datasets import (ADE20KDataset, CityscapesDataset, DatasetError, FolderDataset, VOCDataset,
                           build_dataset)

H, W = 6, 8


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None, palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
        image.putpalette([v for c in palette for v in c])
    else:
        image = Image.fromarray(array)
    image.save(path)


def labels(seed: int, high: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (h, w)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ layouts

def make_cityscapes(root: Path) -> dict:
    truth = {}
    for i, (city, frame) in enumerate([("munster", "000001_000019"), ("aachen", "000000_000019"),
                                       ("aachen", "000001_000019")]):
        stem = f"{city}/{city}_{frame}"
        save(root / "leftImg8bit/val" / f"{stem}_leftImg8bit.png", rgb(i))
        mask = labels(i, 19)
        mask[0, 0] = 255
        save(root / "gtFine/val" / f"{stem}_gtFine_labelTrainIds.png", mask)
        save(root / "gtFine/val" / f"{stem}_gtFine_labelIds.png", labels(i, 34))  # must be ignored
        truth[stem] = (rgb(i), mask)
    return truth


def test_cityscapes_reads_train_ids_sorted_by_relative_name(tmp_path):
    truth = make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, "val")
    assert [s.name for s in ds.samples] == sorted(truth)  # aachen/… before munster/…
    assert len(ds) == 3 and ds.num_classes == 19 and ds.palette == CITYSCAPES_PALETTE
    image, mask, meta = ds[0]
    want_image, want_mask = truth[meta["name"]]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.uint8 and mask.shape == (H, W)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), want_image)
    assert np.array_equal(mask.numpy(), want_mask)
    assert meta["ori_hw"] == (H, W) and meta["mask_path"].endswith("_gtFine_labelTrainIds.png")


def test_cityscapes_without_train_ids_explains_how_to_make_them(tmp_path):
    save(tmp_path / "leftImg8bit/val/x/x_0_0_leftImg8bit.png", rgb(0))
    save(tmp_path / "gtFine/val/x/x_0_0_gtFine_labelIds.png", labels(0, 34))
    with pytest.raises(DatasetError, match=r"x_0_0_leftImg8bit\.png has no mask.*labelTrainIds.*cityscapes\.py"):
        CityscapesDataset(tmp_path, "val")


def test_ade20k_applies_reduce_zero_label_and_accepts_parent_root(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150, 75]] * 2, dtype=np.uint8)
    save(root / "images/validation/ADE_val_00000001.jpg", rgb(0, 2, 4))
    save(root / "annotations/validation/ADE_val_00000001.png", raw)
    ds = ADE20KDataset(tmp_path, "val")
    assert ds.reduce_zero_label and ds.num_classes == 150 and ds.classes == ADE20K_CLASSES
    _, mask, meta = ds[0]
    assert mask[0].tolist() == [255, 0, 149, 74] and meta["name"] == "ADE_val_00000001"


def make_voc(root: Path) -> None:
    names = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"], "aug": ["2008_000002"]}
    for split, stems in names.items():
        (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(stems) + "\n")
        for i, stem in enumerate(stems):
            save(root / f"JPEGImages/{stem}.jpg", rgb(i))
            mask = labels(i, 21)
            mask[-1, :] = 255  # the void border
            if split == "aug":
                save(root / f"SegmentationClassAug/{stem}.png", mask)  # SBD conversions are grey PNGs
            else:
                save(root / f"SegmentationClass/{stem}.png", mask, "P", VOC_PALETTE + ((224, 224, 192),) * 235)


def test_voc_reads_palette_pngs_as_indices_and_concatenates_train_aug(tmp_path):
    make_voc(tmp_path / "VOC2012")
    ds = VOCDataset(tmp_path, "train+aug")  # VOCdevkit given: VOC2012 found inside
    assert [s.name for s in ds.samples] == ["2007_000032", "2007_000039", "2008_000002"]  # split-file order
    assert ds.samples[2].mask_path.parent.name == "SegmentationClassAug"
    _, mask, _ = ds[1]
    want = labels(1, 21)
    want[-1, :] = 255
    assert np.array_equal(mask.numpy(), want)
    val = build_dataset("voc", tmp_path / "VOC2012", "val")
    assert len(val) == 1 and val.samples[0].mask_path.parent.name == "SegmentationClass"


def test_voc_missing_aug_split_points_to_the_converter(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "ImageSets/Segmentation/aug.txt").unlink()
    with pytest.raises(DatasetError, match=r"aug\.txt does not exist.*voc_aug\.py"):
        VOCDataset(tmp_path, "train+aug")


def make_folder(root: Path, spec: dict | None = None, split: str = "val") -> None:
    for i, name in enumerate(["b", "a", "sub/c"]):
        suffix = ".jpg" if name == "a" else ".png"
        save(root / f"images/{split}/{name}{suffix}", rgb(i))
        save(root / f"masks/{split}/{name}.png", labels(i, 3))
    if spec is not None:
        (root / "dataset.json").write_text(json.dumps(spec))


def test_folder_dataset_with_dataset_json(tmp_path):
    make_folder(tmp_path, {"classes": ["bg", "cat", "dog", "unused"], "ignore_index": 200,
                           "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]})
    ds = FolderDataset(tmp_path, "val")
    assert [s.name for s in ds.samples] == ["a", "b", "sub/c"]
    assert ds.classes == ("bg", "cat", "dog", "unused") and ds.ignore_index == 200
    assert ds.palette[1] == (255, 0, 0)
    _, mask, meta = ds[2]
    assert np.array_equal(mask.numpy(), labels(2, 3)) and meta["name"] == "sub/c"


def test_folder_dataset_reduce_zero_label_and_no_json(tmp_path):
    make_folder(tmp_path, {"classes": ["x", "y"], "reduce_zero_label": True})
    _, mask, _ = FolderDataset(tmp_path, "val")[0]
    raw = labels(1, 3)  # "a" was written with seed 1
    want = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    assert np.array_equal(mask.numpy(), want)
    other = tmp_path / "nojson"
    make_folder(other)
    ds = build_dataset("folder", other, "val", num_classes=3)
    assert ds.classes == ("class_0", "class_1", "class_2") and ds.ignore_index == 255
    with pytest.raises(DatasetError, match=r"dataset\.json does not exist"):
        FolderDataset(other, "val")


def test_folder_rgb_masks_map_through_the_palette(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    index = labels(0, 3)
    save(tmp_path / "images/val/x.png", rgb(0))
    save(tmp_path / "masks/val/x.png", np.asarray(palette, dtype=np.uint8)[index])
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"], "palette": palette}))
    _, mask, _ = FolderDataset(tmp_path, "val")[0]
    assert np.array_equal(mask.numpy(), index)


# ------------------------------------------------------------------------------------------------ bad data

def test_image_without_mask_names_both_paths(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"]})
    (tmp_path / "masks/val/b.png").unlink()
    with pytest.raises(DatasetError, match=r"images/val/b\.png has no mask: expected .*masks/val/b\.png"):
        FolderDataset(tmp_path, "val")


def test_image_mask_size_mismatch_names_files_and_sizes(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"]})
    save(tmp_path / "masks/val/a.png", labels(0, 3, H + 1, W))
    ds = FolderDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match=rf"images/val/a\.jpg is {H}×{W} .*masks/val/a\.png is {H + 1}×{W}"):
        ds[0]
    with pytest.raises(DatasetError, match="must match"):
        ds.check()


def test_out_of_range_mask_values_are_listed_with_counts(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"]})
    bad = labels(0, 3)
    bad[0, :3] = 7
    bad[1, 0] = 9
    bad[2, 0] = 255  # ignore_index: fine
    save(tmp_path / "masks/val/a.png", bad)
    ds = FolderDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"masks/val/a\.png: values outside 0\.\.2 .*\{7: 3, 9: 1\}"):
        ds[0]


def test_ade_raw_values_above_150_are_reported_before_reduction(tmp_path):
    save(tmp_path / "images/validation/x.jpg", rgb(0, 2, 2))
    save(tmp_path / "annotations/validation/x.png", np.array([[151, 1], [0, 0]], dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"\{151: 1\}.*"):
        ADE20KDataset(tmp_path, "val")[0]


def test_rgb_mask_without_palette_is_rejected(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"]})
    save(tmp_path / "masks/val/a.png", rgb(5))
    with pytest.raises(DatasetError, match=r"masks/val/a\.png is an RGB colour image and there is no palette"):
        FolderDataset(tmp_path, "val")[0]


def test_rgb_mask_colour_outside_palette_is_rejected(tmp_path):
    save(tmp_path / "images/val/x.png", rgb(0, 2, 2))
    save(tmp_path / "masks/val/x.png", np.array([[[0, 0, 0], [9, 9, 9]]] * 2, dtype=np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a"], "palette": [[0, 0, 0]]}))
    with pytest.raises(DatasetError, match=r"colours not in the palette .*\(9, 9, 9\): 2"):
        FolderDataset(tmp_path, "val")[0]


def test_empty_split_is_rejected(tmp_path):
    (tmp_path / "leftImg8bit/val").mkdir(parents=True)
    (tmp_path / "gtFine/val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split is empty"):
        CityscapesDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"leftImg8bit/train does not exist"):
        CityscapesDataset(tmp_path, "train")


def test_dataset_json_typos_are_named(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"], "ignore_idx": 0})
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['ignore_idx'\]"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0]]}))
    with pytest.raises(DatasetError, match="palette"):
        FolderDataset(tmp_path, "val")


def test_transforms_receive_image_and_mask(tmp_path):
    make_folder(tmp_path, {"classes": ["a", "b", "c"]})
    ds = FolderDataset(tmp_path, "val", transforms=lambda image, mask: (image.flip(-1), mask.flip(-1)))
    image, mask, _ = ds[0]
    assert np.array_equal(mask.numpy(), labels(1, 3)[:, ::-1])
