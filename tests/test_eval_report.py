"""EvalReport's tables and files, the confusion heat map (size, names, cell colours) and the top confused pairs."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.confusion import EMPTY, cell_pixel, colour_of, heatmap, summarize
from eval.metrics import IoUMetric
from eval.report import EvalReport

CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def _report(k=4, metrics=("mIoU", "mDice", "mFscore")):
    rng = np.random.default_rng(0)
    label = rng.integers(0, k - 1, (2, 20, 30))  # class k-1 never labelled
    pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, k, label.shape))
    label[:, 0] = 255
    pred[0, 1, :3] = k + 2  # out of range
    metric = IoUMetric(k, metrics=metrics)
    metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    return EvalReport.from_metric(metric, [f"c{i}" for i in range(k)]), pred, label


def test_report_reads_like_the_old_result_dict_and_exports_tables():
    report, pred, label = _report()
    assert report["mIoU"] == report.values["mIoU"] and "areas" in report and "mDice" in report
    assert report.per_class_keys() == ["IoU", "Acc", "Dice", "Fscore", "Precision", "Recall", "Share"]
    rows = list(csv.reader(io.StringIO(report.to_csv())))
    assert rows[0] == ["class", "index", "IoU", "Acc", "Dice", "Fscore", "Precision", "Recall", "Share",
                       "label_pixels", "pred_pixels", "correct_pixels"]
    keep = label != 255
    for c in range(4):
        row = rows[c + 1]
        assert int(row[-3]) == np.sum(label[keep] == c) and int(row[-2]) == np.sum(pred[keep] == c)
        assert int(row[-1]) == np.sum((pred[keep] == c) & (label[keep] == c))
        for j, key in enumerate(report.per_class_keys()):
            v = report[key][c]
            assert (row[2 + j] == "" and math.isnan(v)) or float(row[2 + j]) == pytest.approx(v)
    assert rows[4][2 + 3] == ""  # class 3 never labelled: Fscore NaN → empty cell
    md = report.to_markdown().splitlines()
    assert md[0] == "| Class | IoU | Acc | Dice | Fscore | Precision | Recall | Share |"
    assert md[2].startswith("| c0 | ") and f"{report['IoU'][0]:.2f}" in md[2]
    assert "fwIoU" in md[-3] and f"{report['mFscore']:.2f}" in md[-1]
    table = report.format_table()
    assert "Fscore" in table and "mDice" in table.splitlines()[-1]


def test_confusion_csv_holds_raw_counts_with_out_of_range_column():
    report, pred, label = _report()
    rows = list(csv.reader(io.StringIO(report.confusion_csv())))
    assert rows[0][1:] == ["c0", "c1", "c2", "c3", "(out of range)"]
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    keep = label != 255
    want = np.zeros((5, 5), dtype=np.int64)
    np.add.at(want, (label[keep], np.minimum(pred[keep], 4)), 1)
    assert counts.tolist() == want.tolist()


def test_top_confused_pairs_are_the_largest_off_diagonal_cells():
    m = torch.tensor([[50, 7, 0], [30, 10, 1], [0, 7, 5]])
    metric = IoUMetric(3)
    metric.confusion = torch.cat([torch.cat([m, torch.zeros(3, 1, dtype=torch.long)], 1),
                                  torch.zeros(1, 4, dtype=torch.long)])
    report = EvalReport.from_metric(metric, ["a", "b", "c"])
    pairs = report.top_confused(3)
    assert [(p["label"], p["prediction"], p["pixels"]) for p in pairs] == [("b", "a", 30), ("a", "b", 7),
                                                                          ("c", "b", 7)]
    assert pairs[0]["percent_of_label"] == pytest.approx(30 / 41 * 100)


def test_report_write_puts_json_and_csvs_and_heat_map_beside_out(tmp_path):
    report, _, _ = _report()
    paths = report.write(tmp_path / "res" / "results.json", {"model": "x"})
    assert sorted(p.name for p in paths) == ["confusion.csv", "confusion.png", "per_class.csv", "per_image.csv",
                                             "results.json"]
    data = json.loads((tmp_path / "res/results.json").read_text())
    assert data["model"] == "x" and data["confusion"] == report.confusion.tolist()
    assert data["Fscore"][3] is None  # NaN written as null
    assert (tmp_path / "res/per_class.csv").read_text() == report.to_csv()


def test_heat_map_19_classes_size_names_and_cell_colours():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(19, 19, generator=g) * 50).long() + torch.diag(torch.randint(100, 900, (19,), generator=g))
    m[16] = 0  # a class without labels: its row is grey
    image = heatmap(m, CITYSCAPES)
    left, top, cell, n = image.info["cells"]
    assert n == 19 and cell >= 24  # room for the numbers
    assert image.width >= left + 19 * cell and image.height > top + 19 * cell
    for row, col in [(0, 0), (3, 5), (18, 2)]:
        want = colour_of(float(m[row, col]) / float(m[row].sum()))
        assert image.getpixel(cell_pixel(image, row, col)) == want
    assert image.getpixel(cell_pixel(image, 16, 0)) == EMPTY
    # the row names are drawn left of the cells: dark pixels in each row's name area
    pixels = np.asarray(image.convert("L"))
    for row in range(19):
        band = pixels[top + row * cell + 4: top + (row + 1) * cell - 4, left - 60:left - 2]
        assert (band < 128).any(), CITYSCAPES[row]
    # and the column names above the cells
    for col in range(19):
        band = pixels[top - 40:top - 2, left + col * cell + 4:left + (col + 1) * cell - 4]
        assert (band < 128).any(), CITYSCAPES[col]


def test_heat_map_150_classes_is_a_summary_with_other_classes():
    g = torch.Generator().manual_seed(1)
    m = (torch.rand(150, 150, generator=g) * 5).long() + torch.diag(torch.randint(0, 1000, (150,), generator=g))
    shown, names = summarize(m, [f"k{i}" for i in range(150)], 40)
    assert shown.shape == (41, 41) and names[-1] == "(other classes)"
    assert int(shown.sum()) == int(m.sum())  # nothing lost: the rest is in the "other" row/column
    rows = m.sum(dim=1)
    kept = [int(name[1:]) for name in names[:-1]]
    assert min(int(rows[c]) for c in kept) >= max(int(rows[c]) for c in range(150) if c not in kept)
    image = heatmap(m, [f"k{i}" for i in range(150)])
    left, top, cell, n = image.info["cells"]
    assert n == 41 and image.width < 1200 and image.height < 1200
    r = names.index(f"k{kept[0]}")
    assert image.getpixel(cell_pixel(image, r, r)) == colour_of(float(shown[r, r]) / float(shown[r].sum()))
