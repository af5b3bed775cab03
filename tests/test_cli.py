"""The `isa` command line: list, info, bench model; and the optimized inference path."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import zoo
from isa.cli import main
from zoo.fuse import optimize_for_inference

VARIANTS_JSON = Path(zoo.__file__).with_name("variants.json")


def test_list_prints_one_name_a_line_with_patterns(capsys):
    assert main(["list", "*r50*ade20k"]) == 0
    assert capsys.readouterr().out.split() == ["isanet_r50-d8_512x512_80k_ade20k",
                                               "isanet_r50-d8_512x512_160k_ade20k"]


def test_info_json_has_variants_json_fields(capsys):
    name = "isanet_r101-d8_769x769_80k_cityscapes"
    assert main(["info", name, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = next(v for v in json.loads(VARIANTS_JSON.read_text())["variants"] if v["name"] == name)
    assert got == want


def test_unknown_model_exits_2_with_close_matches(capsys):
    assert main(["info", "isanet_r50-d8_512x1024_40k_cityscape"]) == 2
    assert "isanet_r50-d8_512x1024_40k_cityscapes" in capsys.readouterr().err


def test_bench_model_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "model", "--size", "64x64", "--device", "cpu", "--repeats", "1",
                 "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ms_median"] > 0 and result["reference_ms_median"] > 0
    assert "ms_median" in capsys.readouterr().out


def test_optimized_path_matches_reference_path():
    torch.manual_seed(0)
    model = zoo.create_model("isanet_r50-d8_512x512_80k_ade20k", num_classes=7).eval()
    for m in model.modules():  # non-trivial BN statistics so folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        want = model.double()(x.double())
        fast = optimize_for_inference(model.float())
        got = fast(x.contiguous(memory_format=torch.channels_last))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) == 0
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-4, err
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 68  # original untouched
