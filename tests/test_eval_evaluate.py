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


# ------------------------------------------------------------------------ batches, per-image scores, pictures

def make_same_size_dataset(root, n=5, k=K, hw=(12, 16)):
    rng = np.random.default_rng(5)
    (root / "images/val").mkdir(parents=True, exist_ok=True)
    (root / "masks/val").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / f"images/val/im{i}.png")
        mask = rng.integers(0, k, hw).astype(np.uint8)
        mask[0, :] = 255
        Image.fromarray(mask).save(root / f"masks/val/im{i}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"][:k]}))
    return FolderDataset(root, "val")


def test_batched_evaluation_gives_the_labels_of_batch_size_one(tmp_path):
    """A real ISANet (BatchNorm, attention): 3 same-size images as one batch vs one at a time."""
    import zoo
    from zoo.inference import view_logits

    dataset = make_same_size_dataset(tmp_path / "data", n=4, hw=(40, 56))
    model = zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes", num_classes=K).eval()
    settings = TestSettings.from_model(model, scale_wh=(56, 40))
    images = torch.stack([dataset[i][0].as_subclass(torch.Tensor) for i in range(3)])
    with torch.no_grad():
        batched = view_logits(model, images, settings)[0][0]
        single = torch.cat([view_logits(model, images[i:i + 1], settings)[0][0] for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)  # fp32 rounding, not other arithmetic
    one = evaluate(model, dataset, settings=settings, batch_size=1, num_workers=0, progress=False,
                   save_preds=tmp_path / "one")
    three = evaluate(model, dataset, settings=settings, batch_size=3, num_workers=0, progress=False,
                     save_preds=tmp_path / "three")
    for i in range(4):  # argmax equal, pixel for pixel
        assert np.array_equal(np.array(Image.open(tmp_path / f"one/im{i}.png")),
                              np.array(Image.open(tmp_path / f"three/im{i}.png")))
    assert torch.equal(one.confusion, three.confusion) and one.per_image == three.per_image


def test_per_image_scores_and_confusion_against_numpy(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    model = StandIn()
    report = evaluate(model, dataset, settings=SETTINGS, batch_size=2, num_workers=0, progress=False)
    total = np.zeros((K + 1, K + 1), dtype=np.int64)
    assert [r["name"] for r in report.per_image] == [s.name for s in dataset.samples]
    for sample, record in zip(dataset.samples, report.per_image):
        pred = predict_label_map(model, read_image(sample.image_path), SETTINGS).numpy().astype(np.int64)
        label = np.array(Image.open(sample.mask_path)).astype(np.int64)
        keep = label != 255
        p, l = pred[keep], label[keep]
        np.add.at(total, (l, p), 1)
        ious = [np.sum((p == c) & (l == c)) / np.sum((p == c) | (l == c)) for c in range(K)
                if np.sum((p == c) | (l == c))]
        assert record["pixels"] == keep.sum()
        assert record["aAcc"] == pytest.approx(np.mean(p == l) * 100, abs=1e-9)
        assert record["mIoU"] == pytest.approx(np.mean(ious) * 100, abs=1e-9)
    assert report.confusion.tolist() == total.tolist()
    assert report.matrix.tolist() == total[:K, :K].tolist()
    csv_rows = report.per_image_csv().splitlines()
    assert csv_rows[0] == "name,labelled_pixels,aAcc,mIoU" and len(csv_rows) == 6


def test_save_errors_draws_the_worst_images_with_error_colour_and_legend(tmp_path):
    from eval.pictures import ERROR_COLOUR, IGNORE_COLOUR, GAP, error_picture

    dataset = make_dataset(tmp_path / "data")
    model = StandIn()
    report = evaluate(model, dataset, settings=SETTINGS, num_workers=0, progress=False, save_errors=2,
                      errors_dir=tmp_path / "errors")
    scores = sorted((r["mIoU"], i) for i, r in enumerate(report.per_image))
    worst = [dataset.samples[i] for _, i in scores[:2]]
    assert [os.path.basename(p) for p in report.error_pictures] == \
        [f"{n + 1:03d}_{s.name.replace('/', '_')}.png" for n, s in enumerate(worst)]
    assert sorted(p.name for p in (tmp_path / "errors").iterdir()) == sorted(
        os.path.basename(p) for p in report.error_pictures)
    sample = worst[0]
    image = read_image(sample.image_path)
    label = torch.from_numpy(np.array(Image.open(sample.mask_path)).astype(np.int64))
    pred = predict_label_map(model, image, SETTINGS)
    picture = Image.open(report.error_pictures[0]).convert("RGB")
    h, w = label.shape
    redrawn = error_picture(image, label, pred, dataset.classes, dataset.palette, title="x")
    assert picture.size == redrawn.size and picture.width > 4 * w + 5 * GAP and picture.height >= h
    pixels = np.array(picture)
    gap, top, pw, ph, scale = redrawn.info["panels"]
    assert (pw, ph, scale) == (w, h, 1.0)
    wrong = ((pred.long() != label) & (label != 255)).nonzero()
    y, x = wrong[0].tolist()
    assert tuple(pixels[top + y, gap + 3 * (w + gap) + x]) == ERROR_COLOUR  # the error panel
    assert tuple(pixels[top, gap + 3 * (w + gap)]) == IGNORE_COLOUR  # column 0 is ignored in these masks
    assert tuple(pixels[top, gap + (w + gap)]) == IGNORE_COLOUR  # the ground-truth panel greys it too
    right = ((pred.long() == label) & (label != 255)).nonzero()
    y, x = right[0].tolist()
    assert tuple(pixels[top + y, gap + 2 * (w + gap) + x]) == tuple(dataset.palette[int(label[y, x])])
    legend = pixels[top:, gap + 4 * (w + gap):]
    for colour in [ERROR_COLOUR, IGNORE_COLOUR] + [dataset.palette[c] for c in label[label != 255].unique()]:
        assert (legend == np.array(colour, dtype=np.uint8)).all(-1).sum() >= 100  # a 13×13 swatch


def test_worst_images_keeps_only_n_payloads():
    from eval.pictures import WorstImages

    made = []
    worst = WorstImages(3)
    rng = np.random.default_rng(0)
    scores = rng.permutation(50).astype(float)
    for i, score in enumerate(scores):
        worst.offer(score, i, lambda i=i: made.append(i) or i)
    worst.offer(float("nan"), 99, lambda: made.append(99))
    assert [s for s, _, _ in worst.items()] == [0.0, 1.0, 2.0]
    assert len(worst._heap) == 3 and 99 not in made and len(made) < 50  # payloads only for contenders


def _ddp_report_worker(rank, world, init_file, root, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = evaluate(StandIn(), FolderDataset(root, "val"), settings=SETTINGS, num_workers=0, progress=False,
                          batch_size=2, save_errors=2, errors_dir=os.path.join(root, "errors"))
        queue.put((rank, report.to_dict()))
    finally:
        dist.destroy_process_group()


def test_ddp_report_equals_single_process(tmp_path):
    """Per-image scores gathered, the confusion matrix summed, the worst images drawn by whichever rank has them."""
    import torch.multiprocessing as mp
    dataset = make_dataset(tmp_path)
    single = evaluate(StandIn(), dataset, settings=SETTINGS, num_workers=0, progress=False, batch_size=2,
                      save_errors=2, errors_dir=tmp_path / "errors1").to_dict()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    procs = [ctx.Process(target=_ddp_report_worker, args=(r, 2, init_file, tmp_path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, got in results:
        assert json.dumps(got, sort_keys=True) == json.dumps(single, sort_keys=True)
    assert sorted(p.name for p in (tmp_path / "errors").iterdir()) == sorted(
        p.name for p in (tmp_path / "errors1").iterdir())
