"""`evaluate()` as the training loop calls it: limits, modes, predictions on disk, DDP sharding, bad calls."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from eval.datasets import FolderDataset
from zoo.images import read_image
from eval.evaluate import evaluate
from zoo.inference import TestSettings, predict_label_map

K = 3


class StandIn(nn.Module):
    """A 1×1 conv with fixed weights, exposing what evaluate() uses: forward (a normalised batch -> logits at
    its size), num_classes, align_corners."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, 1)
        self.num_classes, self.align_corners = K, False

    def forward(self, x):
        return self.conv(x)


SETTINGS = TestSettings(scale_wh=(20, 12))


def make_dataset(root, n=5):
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 10 + i, 14
        name = f"sub/im{i}" if i % 2 else f"im{i}"
        (root / "images/val" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "masks/val" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"images/val/{name}.png")
        mask = rng.integers(0, K, (h, w)).astype(np.uint8)
        mask[:, 0] = 255
        Image.fromarray(mask).save(root / f"masks/val/{name}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    return FolderDataset(root, "val")


def reference_iou(model, dataset, count):
    """Per-image label maps, then spec §6's dataset-level sums in numpy."""
    inter, union = np.zeros(K), np.zeros(K)
    for sample in dataset.samples[:count]:
        pred = predict_label_map(model, read_image(sample.image_path), SETTINGS).numpy()
        label = np.array(Image.open(sample.mask_path)).astype(np.int64)
        keep = label != 255
        p, l = pred[keep], label[keep]
        for c in range(K):
            inter[c] += np.sum((p == c) & (l == c))
            union[c] += np.sum((p == c) | (l == c))
    with np.errstate(invalid="ignore"):
        return np.where(union > 0, inter / union * 100, np.nan)


def test_evaluate_limits_images_restores_mode_and_matches_reference(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    model = StandIn().train()
    result = evaluate(model, dataset, settings=SETTINGS, max_images=4, num_workers=0, progress=False,
                      save_preds=tmp_path / "preds")
    assert model.training  # restored after evaluation
    assert result["num_images"] == 4 and result["classes"] == ["a", "b", "c"]
    np.testing.assert_allclose(result["IoU"], reference_iou(model, dataset, 4), atol=1e-9, equal_nan=True)
    assert sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png")) == \
        ["im0.png", "im2.png", "im4.png", "sub/im1.png"]  # sorted relative names


def test_evaluate_with_workers_equals_without(tmp_path):
    dataset = make_dataset(tmp_path)
    model = StandIn()
    a = evaluate(model, dataset, settings=SETTINGS, num_workers=0, progress=False)
    b = evaluate(model, dataset, settings=SETTINGS, num_workers=1, progress=False)
    assert a["areas"] == b["areas"] and a["num_images"] == 5


def test_evaluate_rejects_mismatched_models_and_transformed_datasets(tmp_path):
    dataset = make_dataset(tmp_path)
    model = StandIn()
    model.num_classes = 19
    with pytest.raises(ValueError, match="predicts 19 classes"):
        evaluate(model, dataset, settings=SETTINGS, num_workers=0, progress=False)
    transformed = FolderDataset(tmp_path, "val", transforms=lambda i, m: (i, m))
    with pytest.raises(ValueError, match="without transforms"):
        evaluate(StandIn(), transformed, settings=SETTINGS, num_workers=0, progress=False)


def _ddp_worker(rank, world, init_file, root, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = evaluate(StandIn(), FolderDataset(root, "val"), settings=SETTINGS, num_workers=0, progress=False)
        queue.put((rank, result["areas"], result["num_images"]))
    finally:
        dist.destroy_process_group()


def test_evaluate_under_ddp_shards_images_and_sums_counts(tmp_path):
    import torch.multiprocessing as mp
    dataset = make_dataset(tmp_path)  # 5 images: ranks take 3 and 2, nothing duplicated
    single = evaluate(StandIn(), dataset, settings=SETTINGS, num_workers=0, progress=False)
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    queue = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init_file, tmp_path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, areas, num_images in results:
        assert areas == single["areas"] and num_images == 5
