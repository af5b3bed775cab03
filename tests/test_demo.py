"""`isa demo`: the procedural scene generator and a --quick run of the whole demo."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.synthetic import SCENE_CLASSES, make_scene_dataset, render_scene

SIZE = (64, 80)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str):
    names = sorted(p.name for p in (root / "images" / split).iterdir())
    images = [np.asarray(Image.open(root / "images" / split / n).convert("RGB")) for n in names]
    masks = [np.asarray(Image.open(root / "masks" / split / n)) for n in names]
    return images, masks


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scene_dataset(tmp_path_factory.mktemp("scenes"), num_train=12, num_val=3, size_hw=SIZE, seed=3)


def test_scene_dataset_is_byte_identical_for_a_seed_and_differs_for_another(scenes, tmp_path):
    again = make_scene_dataset(tmp_path / "again", num_train=12, num_val=3, size_hw=SIZE, seed=3)
    other = make_scene_dataset(tmp_path / "other", num_train=12, num_val=3, size_hw=SIZE, seed=4)
    assert _files(scenes) == _files(again)
    differ = [k for k, v in _files(scenes).items() if _files(other).get(k) != v]
    assert len(differ) >= 30  # every image and mask of 15 scenes, not just dataset.json


def test_val_scenes_do_not_depend_on_the_train_count(scenes, tmp_path):
    fewer = make_scene_dataset(tmp_path / "fewer", num_train=2, num_val=3, size_hw=SIZE, seed=3)
    val = {k: v for k, v in _files(scenes).items() if "/val/" in k}
    assert val and val == {k: v for k, v in _files(fewer).items() if "/val/" in k}


def test_scene_layout_loads_with_folder_dataset_and_has_every_class(scenes):
    from eval.datasets import FolderDataset

    spec = json.loads((scenes / "dataset.json").read_text())
    assert spec["classes"] == list(SCENE_CLASSES) and len(spec["classes"]) >= 4
    for split, count in (("train", 12), ("val", 3)):
        ds = FolderDataset(scenes, split)
        assert len(ds) == count and ds.num_classes == len(SCENE_CLASSES) and ds.classes == tuple(spec["classes"])
        image, mask, meta = ds[0]
        assert tuple(image.shape) == (3, *SIZE) and tuple(mask.shape) == SIZE and meta["name"] == "scene_000"
    _, masks = _load(scenes, "train")
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)
    assert counts[len(SCENE_CLASSES):].sum() == 0  # only class indices, nothing unlabelled
    shares = counts[:len(SCENE_CLASSES)] / counts.sum()
    assert shares.min() > 0.03, shares  # every class is present with a real share of the pixels
    for mask in masks:  # sky and ground in every scene, and at least two object kinds survive occlusion
        present = set(np.unique(mask).tolist())
        assert {0, 1} <= present and len(present & {2, 3, 4}) >= 2


def test_scene_textures_are_not_flat(scenes):
    images, masks = _load(scenes, "train")
    grey_weights = np.array([0.299, 0.587, 0.114])
    per_class = {c: [] for c in range(len(SCENE_CLASSES))}
    for image, mask in zip(images, masks):
        grey = image.astype(np.float64) @ grey_weights
        for c in per_class:
            region = grey[mask == c]
            if region.size >= 100:
                per_class[c].append(region.std())
    # the sensor noise alone is N(0, 4) per channel, a grey std of about 2.7
    for c, stds in per_class.items():
        assert stds and np.median(stds) > 9.0, (SCENE_CLASSES[c], np.median(stds) if stds else None)


def test_colour_alone_does_not_identify_the_class(scenes):
    # A nearest-class-mean colour classifier, fitted on train and scored on all pixels, is no better
    # than a weak guess: the network has to use texture, shape and position.
    images, masks = _load(scenes, "train")
    pixels = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float64)
    labels = np.concatenate([m.ravel() for m in masks])
    means = np.stack([pixels[labels == c].mean(axis=0) for c in range(len(SCENE_CLASSES))])
    assert np.ptp(means, axis=0).max() < 40  # class mean colours lie close together
    nearest = np.argmin(((pixels[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (nearest == labels).mean()
    majority = np.bincount(labels).max() / labels.size
    assert accuracy < majority + 0.1, (accuracy, majority)


def test_render_scene_rejects_nothing_and_keeps_labels_in_range():
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, mask = render_scene(rng, (40, 48))
        assert image.dtype == np.uint8 and image.shape == (40, 48, 3)
        assert mask.dtype == np.uint8 and int(mask.max()) < len(SCENE_CLASSES)


def test_make_scene_dataset_rejects_tiny_images_naming_the_size(tmp_path):
    with pytest.raises(ValueError, match=r"size_hw.*\(16, 64\)"):
        make_scene_dataset(tmp_path, size_hw=(16, 64))


def test_resolve_model_prefers_a_variant_with_cached_weights(tmp_path, monkeypatch):
    from isa.demo import resolve_model

    monkeypatch.setenv("ISA_HOME", str(tmp_path))
    assert resolve_model("r50-d8") == "isanet_r50-d8_512x1024_40k_cityscapes"  # first in `isa list` order
    assert resolve_model("isanet_r101-d8_512x512_20k_voc12aug") == "isanet_r101-d8_512x512_20k_voc12aug"
    (tmp_path / "isanet_r50-d8_512x512_20k_voc12aug.safetensors").write_bytes(b"x")
    assert resolve_model("r50-d8") == "isanet_r50-d8_512x512_20k_voc12aug"
    with pytest.raises(KeyError):
        resolve_model("isanet_r999")


def test_demo_refuses_a_non_empty_folder_it_did_not_write(tmp_path):
    from isa.demo import run_demo

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by `isa demo`"):
        run_demo(tmp_path, quick=True, progress=False, say=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_folder_the_demo_wrote_is_cleared_for_the_next_run(tmp_path):
    from isa.demo import _prepare_out

    out = tmp_path / "demo"
    _prepare_out(out)  # a new folder: created and marked
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / "checkpoints" / "iter_300.pt").write_bytes(b"old")
    (out / "data").mkdir()
    _prepare_out(out)
    assert not (out / "train").exists() and not (out / "data").exists() and (out / ".isa-demo").is_file()


def test_quick_demo_writes_every_output_and_reports_the_figures(tmp_path, monkeypatch, capsys):
    from eval.datasets import FolderDataset
    from isa.cli import main

    import train.engine as engine

    monkeypatch.setenv("ISA_HOME", str(tmp_path / "empty_cache"))  # no cached weights: random init
    built = []
    real_build = engine.build_model

    def recording_build(cfg, num_classes, **kwargs):
        model = real_build(cfg, num_classes, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(engine, "build_model", recording_build)
    out = tmp_path / "demo"
    try:
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["weights"] == "random" and "random initialisation" in printed
        assert summary["model"] == "isanet_r50-d8_512x1024_40k_cityscapes" and summary["classes"] == list(SCENE_CLASSES)
        for key in ("miou_before", "miou_after", "aacc_before", "aacc_after"):
            assert 0.0 <= summary[key] <= 100.0
        assert len(summary["iou_after"]) == len(SCENE_CLASSES)
        assert f"mIoU before fine-tuning: {summary['miou_before']:.1f}" in printed
        for key in ("curves", "train_curves", "comparison", "trained_weights"):
            assert Path(summary[key]).is_file(), key
        assert Image.open(summary["curves"]).size == (800, 560)
        assert summary["overlays"] and all(Path(p).is_file() for p in summary["overlays"])
        assert not (out / "train" / "checkpoints").exists()  # the 300 MB resumable state is removed
        assert len(FolderDataset(out / "data", "train")) == 4 and len(FolderDataset(out / "data", "val")) == 2
        cpu = summary["kernels"]["cpu"]
        assert [r["pattern"] for r in cpu] == ["long", "short"] and all(r["eager_ms"] > 0 for r in cpu)
        interp = summary["kernels"]["interpreter"]
        if "skipped" not in interp:
            assert interp["ok"] is True, interp
        assert "Kernel speed needs a GPU" in printed
        # "before" was measured on exactly the model the training run started from
        assert len(built) == 2 and built[0].keys() == built[1].keys()
        assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~150 MB of weights
