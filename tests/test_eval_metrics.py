"""IoUMetric against hand-computed cases and an fp64 numpy transcription of spec §6 (per-image histograms)."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch

from eval.metrics import IoUMetric, reduce_zero_label_, round_like_mmseg


def reference_metrics(pairs, num_classes, ignore_index=255, reduce_zero_label=False):
    """Spec §6 written out: per-image histc-style histograms over in-range values, summed, then ratios."""
    k = num_classes
    total = {name: np.zeros(k, dtype=np.float64) for name in ("intersect", "union", "pred", "label")}
    for pred, label in pairs:
        pred = np.asarray(pred, dtype=np.int64).ravel()
        label = np.asarray(label, dtype=np.int64).ravel().copy()
        if reduce_zero_label:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]

        def hist(values):
            return np.array([np.sum(values == c) for c in range(k)], dtype=np.float64)

        area_i, area_p, area_l = hist(pred[pred == label]), hist(pred), hist(label)
        total["intersect"] += area_i
        total["pred"] += area_p
        total["label"] += area_l
        total["union"] += area_p + area_l - area_i
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(total["union"] > 0, total["intersect"] / total["union"], np.nan)
        acc = np.where(total["label"] > 0, total["intersect"] / total["label"], np.nan)
        aacc = total["intersect"].sum() / total["label"].sum()
    return {"aAcc": aacc * 100, "mIoU": np.nanmean(iou) * 100 if not np.all(np.isnan(iou)) else np.nan,
            "mAcc": np.nanmean(acc) * 100 if not np.all(np.isnan(acc)) else np.nan,
            "IoU": list(iou * 100), "Acc": list(acc * 100)}


def assert_same(got, want):
    for key in ("aAcc", "mIoU", "mAcc"):
        assert (math.isnan(got[key]) and math.isnan(want[key])) or got[key] == pytest.approx(want[key], abs=1e-9), key
    np.testing.assert_allclose(got["IoU"], want["IoU"], atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got["Acc"], want["Acc"], atol=1e-9, equal_nan=True)


def test_hand_computed_case_with_absent_class_and_predicted_only_class():
    # K = 4. Class 2 appears nowhere (NaN, excluded from the means); class 3 is predicted but never labelled
    # (IoU 0, Acc NaN). Pixels: (pred, label) = (0,0) (0,0) (1,0) (1,1) (3,1) (0,255).
    pred = torch.tensor([[0, 0, 1], [1, 3, 0]])
    label = torch.tensor([[0, 0, 0], [1, 1, 255]])
    metric = IoUMetric(4)
    metric.update(pred, label)
    r = metric.compute()
    # class 0: I=2, P=2, L=3 → U=3; class 1: I=1, P=2, L=2 → U=3; class 3: I=0, P=1, L=0 → U=1.
    assert r["IoU"][0] == pytest.approx(200 / 3) and r["IoU"][1] == pytest.approx(100 / 3)
    assert math.isnan(r["IoU"][2]) and r["IoU"][3] == 0.0
    assert r["Acc"][0] == pytest.approx(200 / 3) and r["Acc"][1] == 50.0
    assert math.isnan(r["Acc"][2]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == pytest.approx((200 / 3 + 100 / 3 + 0) / 3)
    assert r["mAcc"] == pytest.approx((200 / 3 + 50) / 2)
    assert r["aAcc"] == pytest.approx(60.0)  # 3 correct of 5 labelled pixels


def test_all_ignored_image_contributes_nothing():
    rng = np.random.default_rng(0)
    pred, label = rng.integers(0, 3, (5, 6)), rng.integers(0, 3, (5, 6))
    alone = IoUMetric(3)
    alone.update(torch.from_numpy(pred), torch.full((5, 6), 255))
    r = alone.compute()
    assert math.isnan(r["aAcc"]) and math.isnan(r["mIoU"]) and all(math.isnan(v) for v in r["IoU"])
    with_it, without = IoUMetric(3), IoUMetric(3)
    with_it.update(torch.from_numpy(pred), torch.from_numpy(label))
    with_it.update(torch.from_numpy(pred), torch.full((5, 6), 255))
    without.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert_same(with_it.compute(), without.compute())


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts_the_rest():
    raw = torch.tensor([0, 1, 2, 150, 255], dtype=torch.uint8)
    assert reduce_zero_label_(raw).tolist() == [255, 0, 1, 149, 255]
    assert raw.tolist() == [0, 1, 2, 150, 255]  # input untouched
    pred = torch.tensor([[0, 1], [1, 1]])
    label_raw = torch.tensor([[1, 2], [0, 1]])  # → [[0, 1], [255, 0]]
    metric = IoUMetric(2, reduce_zero_label=True)
    metric.update(pred, label_raw)
    r = metric.compute()
    # kept pixels (pred, label): (0,0) (1,1) (1,0); the prediction on the ignored pixel is dropped.
    # class 0: I=1 P=1 L=2 U=2; class 1: I=1 P=2 L=1 U=2 → IoU 50 / 50, aAcc 2/3.
    assert r["IoU"] == [50.0, 50.0] and r["aAcc"] == pytest.approx(200 / 3)
    assert_same(r, reference_metrics([(pred, label_raw)], 2, reduce_zero_label=True))


def test_batched_update_equals_per_image_updates_and_reference():
    rng = np.random.default_rng(1)
    preds = rng.integers(0, 5, (4, 7, 9))
    labels = rng.integers(0, 5, (4, 7, 9))
    labels[rng.random(labels.shape) < 0.2] = 255
    batched, single = IoUMetric(5), IoUMetric(5)
    batched.update(torch.from_numpy(preds), torch.from_numpy(labels))
    for p, l in zip(preds, labels):
        single.update(torch.from_numpy(p), torch.from_numpy(l))
    assert torch.equal(batched.areas()["union"], single.areas()["union"])
    assert batched.num_images == single.num_images == 4
    assert_same(batched.compute(), reference_metrics(zip(preds, labels), 5))


def test_out_of_range_values_are_dropped_like_histc():
    # MMSegmentation's histc drops values outside 0..K-1 from that histogram only.
    pred = torch.tensor([[0, 7, 1, 2, 2]])
    label = torch.tensor([[0, 0, 9, 2, 255]])
    metric = IoUMetric(3)
    metric.update(pred, label)
    assert_same(metric.compute(), reference_metrics([(pred, label)], 3))


def test_random_images_match_reference_with_custom_ignore_index():
    rng = np.random.default_rng(2)
    pairs = []
    metric = IoUMetric(6, ignore_index=0)
    for shape in [(3, 4), (8, 5), (1, 1), (6, 6)]:
        p, l = rng.integers(0, 6, shape), rng.integers(0, 6, shape)
        pairs.append((p, l))
        metric.update(torch.from_numpy(p).to(torch.uint8), torch.from_numpy(l).to(torch.uint8))
    assert_same(metric.compute(), reference_metrics(pairs, 6, ignore_index=0))


def test_round_like_mmseg_uses_numpy_rounding():
    assert round_like_mmseg({"mIoU": 78.485, "IoU": [float("nan"), 1.0049]}) == {
        "mIoU": float(np.round(78.485, 2)), "IoU": [pytest.approx(float("nan"), nan_ok=True), 1.0]}


def test_bad_inputs_raise_clear_errors():
    metric = IoUMetric(3)
    with pytest.raises(ValueError, match="pred shape"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        metric.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(3)
        preds, labels = rng.integers(0, 4, (4, 5, 5)), rng.integers(0, 4, (4, 5, 5))
        metric = IoUMetric(4)
        for i in range(rank, 4, world):  # each rank sees half the images
            metric.update(torch.from_numpy(preds[i]), torch.from_numpy(labels[i]))
        queue.put((rank, metric.compute()["IoU"], metric.compute()["mIoU"]))
    finally:
        dist.destroy_process_group()


def test_compute_sums_over_ddp_ranks():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    queue = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init_file, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (iou, miou)) for r, iou, miou in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rng = np.random.default_rng(3)
    preds, labels = rng.integers(0, 4, (4, 5, 5)), rng.integers(0, 4, (4, 5, 5))
    want = reference_metrics(zip(preds, labels), 4)
    for rank in (0, 1):
        np.testing.assert_allclose(results[rank][0], want["IoU"], atol=1e-9)
        assert results[rank][1] == pytest.approx(want["mIoU"])
