"""The `isa` command line: list, info, bench model; and the optimized inference path."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import zoo
from isa.cli import main
from zoo.fuse import optimize_for_inference

VARIANTS_JSON = Path(zoo.__file__).with_name("variants.json")
REPO = Path(__file__).resolve().parents[1]


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


def _isa(*args: str) -> list:
    return [sys.executable, "-m", "isa", *args]


def test_a_closed_pipe_ends_the_output_quietly():
    """`isa list | head -n 1` through a real shell pipe, and a reader that is gone before the first line:
    no traceback, no 'Broken pipe' error; the writer exits 141 (128 + SIGPIPE) like Unix tools."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shell = subprocess.run(f"{shlex.join(_isa('list'))} | head -n 1", shell=True, capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=120)
    assert shell.returncode == 0 and shell.stdout == zoo.list_models()[0] + "\n" and shell.stderr == ""
    proc = subprocess.Popen(_isa("list"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    proc.stdout.close()  # the reader is gone before the program writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_third_party_info_logging_is_silenced_unless_verbose(capsys):
    import logging

    from isa.cli import _QuietFilter

    record = logging.LogRecord("onnx_ir.passes", logging.INFO, __file__, 1, "Removed 629 unused nodes", None, None)
    own = logging.LogRecord("train.engine", logging.INFO, __file__, 1, "resumed", None, None)
    warning = logging.LogRecord("onnxscript", logging.WARNING, __file__, 1, "careful", None, None)
    assert not _QuietFilter(False).filter(record) and _QuietFilter(True).filter(record)
    assert _QuietFilter(False).filter(own) and _QuietFilter(False).filter(warning)
