"""Our IoUMetric against MMSegmentation 1.2.2's own IoUMetric (mIoU, mDice, mFscore, beta, nan_to_num).

The reference numbers were computed by MMSegmentation itself in its side environment:
``/work/mmseg_env/bin/python tools/mmseg_metric_reference.py`` wrote ``tests/data/mmseg_metric/inputs.npz``
(the seeded predictions and raw labels it was fed) and ``results.json`` (its summed areas, its unrounded
per-class values from ``IoUMetric.total_area_to_metrics`` and the rounded summary of ``compute_metrics``).
See tools/MMSEG_REFERENCE.md, "Metric reference", to regenerate them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.metrics import IoUMetric, round_like_mmseg

DATA = Path(__file__).parent / "data" / "mmseg_metric"
REFERENCE = json.loads((DATA / "results.json").read_text())
INPUTS = np.load(DATA / "inputs.npz")
CASES = {case["name"]: case for case in REFERENCE["cases"]}


def _ours(case: dict) -> IoUMetric:
    metric = IoUMetric(case["num_classes"], case["ignore_index"], reduce_zero_label=case["reduce_zero_label"],
                       metrics=case["iou_metrics"], beta=case["beta"], nan_to_num=case["nan_to_num"])
    for i in range(case["num_images"]):
        pred = torch.from_numpy(INPUTS[f"{case['inputs']}_pred_{i}"])
        label = torch.from_numpy(INPUTS[f"{case['inputs']}_label_{i}"])
        metric.update(pred, label)
    return metric


def test_reference_was_made_by_mmsegmentation_1_2_2_and_covers_the_cases():
    assert REFERENCE["versions"]["mmsegmentation"] == "1.2.2"
    assert {c["num_classes"] for c in CASES.values()} == {19, 150}
    assert any(c["reduce_zero_label"] for c in CASES.values())
    k19 = CASES["k19_beta1"]["per_class"]
    # the inputs contain what the cases claim: an absent class (16), a predicted-only class (17) and a
    # labelled-only class (15: Dice 0, Fscore NaN)
    assert np.isnan(k19["IoU"][16]) and k19["IoU"][17] == 0.0 and np.isnan(k19["Acc"][17])
    assert k19["Dice"][15] == 0.0 and np.isnan(k19["Fscore"][15])
    for prefix in ("k19", "k150"):  # out-of-range predictions present
        preds = [INPUTS[k] for k in INPUTS.files if k.startswith(f"{prefix}_pred_")]
        k = 19 if prefix == "k19" else 150
        assert any((p >= k).any() for p in preds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_class_values_and_summary_equal_mmsegmentation(name):
    case = CASES[name]
    got = _ours(case).compute()
    want = case["per_class"]
    keys = [k for k in want if k != "aAcc"]
    assert [k for k in got if k in want and k != "aAcc"] == keys  # the same groups, in MMSeg's order
    for key in keys:  # MMSeg computes in float32: agreement to its rounding
        np.testing.assert_allclose(np.array(got[key]) / 100, want[key], rtol=2e-7, atol=1e-9, equal_nan=True,
                                   err_msg=f"{name}: {key}")
    np.testing.assert_allclose(got["aAcc"] / 100, want["aAcc"], rtol=2e-7)
    # the rounded summary compute_metrics returns: same names, same 2-decimal values
    summary = round_like_mmseg({k: got[k] for k in case["summary"]})
    assert set(summary) == set(case["summary"])
    for key, value in case["summary"].items():
        assert summary[key] == pytest.approx(value, abs=1e-4), (name, key)


@pytest.mark.parametrize("name", ["k19_beta1", "k150_rzl_beta1"])
def test_confusion_matrix_sums_reproduce_mmsegmentation_areas_exactly(name):
    case = CASES[name]
    metric = _ours(case)
    k = case["num_classes"]
    m = metric.confusion  # (K+1)×(K+1): rows labels, columns predictions; index K = outside 0..K-1
    diagonal = torch.diagonal(m)[:k]
    rows, cols = m.sum(dim=1)[:k], m.sum(dim=0)[:k]
    assert diagonal.tolist() == case["area_intersect"]
    assert rows.tolist() == case["area_label"]
    assert cols.tolist() == case["area_pred_label"]
    assert (rows + cols - diagonal).tolist() == case["area_union"]
    areas = metric.areas()  # what compute() divides
    assert areas["union"].tolist() == case["area_union"] and areas["intersect"].tolist() == case["area_intersect"]


def test_fscore_differs_from_dice_where_the_intersection_is_zero():
    got = _ours(CASES["k19_beta1"]).compute()
    assert got["Dice"][15] == 0.0 and np.isnan(got["Fscore"][15])
    assert got["mFscore"] != pytest.approx(got["mDice"])
