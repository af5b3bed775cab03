"""`isa bench data` on generated data: the layouts the readers expect, a per-sample time, the JSON."""
from __future__ import annotations

import json

from eval.datasets import ADE20KDataset
from train.bench import bench_data, make_benchmark_data

ADE_RECIPE = "isanet_r50-d8_512x512_80k_ade20k"


def test_benchmark_data_is_read_by_the_ade20k_reader_with_reduce_zero_label(tmp_path):
    root = make_benchmark_data(tmp_path, "ade20k", num_images=2)
    reader = ADE20KDataset(root, "train")
    image, mask, _ = reader[1]
    assert len(reader) == 2 and tuple(image.shape) == (3, 683, 512)
    assert int(mask[mask != 255].max()) < 150  # stored 1..150 -> 0..149, stored 0 -> 255


def test_isa_bench_data_prints_a_row_and_writes_ms_per_sample(tmp_path, capsys):
    from isa.cli import main

    out = tmp_path / "data.json"
    code = main(["bench", "data", "--recipe", ADE_RECIPE, "--data-root", str(tmp_path / "ade"), "--make-data", "2",
                 "--samples", "2", "--warmup", "1", "--json", str(out)])
    assert code in (0, None)
    result = json.loads(out.read_text())
    assert result["ms_per_sample"] > 0 and result["workers"] == 0 and result["pipeline"] == "fast"
    assert "ms/sample" in capsys.readouterr().out


def test_bench_data_with_a_worker_reports_the_loader_throughput(tmp_path):
    root = make_benchmark_data(tmp_path, "ade20k", num_images=2)
    result = bench_data(ADE_RECIPE, root, workers=1, samples=2, warmup=1, batch_size=1)
    assert result["samples"] == 2 and result["samples_per_s"] > 0
