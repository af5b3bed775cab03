"""`isa export`: ONNX files and AOTInductor packages of the eval-mode network, checked against PyTorch's fp32
logits on seeded random weights (max |diff| / max |logit| <= 1e-4 and every pixel's argmax equal), and
`zoo.Segmenter` / `isa predict` running an ONNX file through onnxruntime."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from isa.cli import main
from zoo.export import OnnxRuntimeModel, export_model, padded_trace_size, read_onnx_meta, sidecar_path
from zoo.metadata import ModelMeta

R50 = "isanet_r50-d8_512x1024_40k_cityscapes"
R101 = "isanet_r101-d8_512x1024_40k_cityscapes"
MAX_REL_ERROR = 1e-4
PROJECT_PACKAGES = ("zoo", "isa", "isa_triton", "eval", "train")


def needs_onnx() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


def seeded_model(name: str, seed: int = 0) -> zoo.ISANet:
    """Random weights where every layer matters: each BatchNorm (the blocks' zero-initialised last one
    included) gets its own statistics, scale and shift."""
    torch.manual_seed(seed)
    model = zoo.create_model(name, backend="eager")
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model.eval()


def images(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def compare(got: torch.Tensor, want: torch.Tensor) -> Tuple[float, float]:
    """(max |got - want| / max |want|, share of pixels whose argmax over classes agrees)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    rel = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    return rel, float((got.argmax(1) == want.argmax(1)).double().mean())


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    rel, agree = compare(got, want)
    assert rel <= MAX_REL_ERROR and agree == 1.0, f"max relative error {rel:.2e}, argmax agreement {agree:.6f}"


def torch_logits(model: zoo.ISANet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def same_meta(a: ModelMeta, b: ModelMeta) -> bool:
    """Equal but for the `export_*` entries an exported file adds."""
    strip = {k: v for k, v in a.extra.items() if not k.startswith("export_")}
    return ModelMeta(**{**a.__dict__, "extra": strip}) == ModelMeta(**{**b.__dict__, "extra": {}})


@pytest.fixture(scope="module")
def r50() -> zoo.ISANet:
    return seeded_model(R50)


@pytest.fixture(scope="module")
def static_onnx(r50, tmp_path_factory) -> Path:
    """R-50 at an odd size whose 1/8 map (9x13) needs ISA's padding on both axes, batch 1."""
    needs_onnx()
    return export_model(r50, tmp_path_factory.mktemp("static") / "r50.onnx", size=(65, 97))


EXPORT_OUTPUT = {}


@pytest.fixture(scope="module")
def dynamic_onnx(r50, tmp_path_factory) -> Path:
    """R-50 with dynamic N, H, W, written by the command line (a child process, as a user runs it) from a
    weights file; what it printed is kept in EXPORT_OUTPUT."""
    needs_onnx()
    from zoo.weights import save_weights

    folder = tmp_path_factory.mktemp("dynamic")
    weights = save_weights(r50.state_dict(), folder / "r50.safetensors", r50.meta)
    out = folder / "r50.onnx"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "isa", "export", "--weights", str(weights), "--format", "onnx",
                           "--size", "64x64", "--dynamic", "--out", str(out)], capture_output=True, text=True,
                          cwd=repo, timeout=600, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert done.returncode == 0, done.stdout + done.stderr
    EXPORT_OUTPUT.update(stdout=done.stdout, stderr=done.stderr)
    weights.unlink()
    return out


def test_export_says_what_it_wrote_in_at_most_five_lines(dynamic_onnx):
    """Quiet by default: no third-party INFO logging (onnxscript's passes printed 66 lines), one success line."""
    lines = (EXPORT_OUTPUT["stdout"] + EXPORT_OUTPUT["stderr"]).splitlines()
    assert 1 <= len(lines) <= 5, "\n".join(lines)
    assert sum(line.startswith("wrote ") for line in lines) == 1 and str(dynamic_onnx) in "\n".join(lines)
    assert not any(line.startswith("INFO onnx") for line in lines)


# --------------------------------------------------------------------------------------------------
# ONNX against PyTorch


@pytest.mark.parametrize("name,size", [
    pytest.param(R50, (65, 97), id="r50-65x97"),
    pytest.param(R50, (64, 64), id="r50-64x64", marks=pytest.mark.slow),
    pytest.param(R101, (65, 97), id="r101-65x97", marks=pytest.mark.slow),
    pytest.param(R101, (64, 64), id="r101-64x64", marks=pytest.mark.slow),
])
def test_onnx_export_matches_pytorch_fp32_logits(name, size, r50, request, tmp_path):
    """65x97: odd, its 9x13 feature map is padded to 16x16; 64x64: an 8x8 map, no padding."""
    needs_onnx()
    if (name, size) == (R50, (65, 97)):  # the export other tests share
        model, path = r50, request.getfixturevalue("static_onnx")
    else:
        model = seeded_model(name)
        path = export_model(model, tmp_path / "model.onnx", size=size)
    runner = OnnxRuntimeModel(path)
    x = images((1, 3, *size))
    assert_matches(runner(x), torch_logits(model, x))
    assert runner.input_shape == (1, 3, *size)


def test_static_onnx_runs_a_larger_batch_image_by_image(r50, static_onnx):
    x = images((2, 3, 65, 97), seed=2)
    assert_matches(OnnxRuntimeModel(static_onnx)(x), torch_logits(r50, x))


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 3, 72, 64), (1, 3, 64, 96), (2, 3, 65, 97), (1, 3, 33, 120)],
                         ids=["no-padding", "height-padded", "width-padded", "both-padded-batch2", "thin"])
def test_dynamic_onnx_export_runs_at_sizes_it_was_not_traced_at(shape, r50, dynamic_onnx):
    """Traced at 72x72 (asked 64x64: its 8x8 map needs no padding, so the trace moves to a padded one);
    ISA's padding amounts differ at each of these sizes and are computed inside the graph."""
    assert padded_trace_size((64, 64)) == (72, 72)
    runner = OnnxRuntimeModel(dynamic_onnx)
    assert runner.input_shape == (None, 3, None, None)
    x = images(shape, seed=3)
    assert_matches(runner(x), torch_logits(r50, x))


def test_onnx_file_carries_the_model_metadata(r50, static_onnx, dynamic_onnx):
    meta = read_onnx_meta(static_onnx)
    assert same_meta(meta, r50.meta)
    assert meta.extra["export_format"] == "onnx" and meta.extra["export_size_hw"] == "[65, 97]"
    assert meta.extra["export_dynamic"] == "false" and int(meta.extra["export_opset"]) >= 17
    assert read_onnx_meta(dynamic_onnx).extra["export_dynamic"] == "true"


# --------------------------------------------------------------------------------------------------
# Segmenter and `isa predict` through onnxruntime


def test_segmenter_runs_an_onnx_file_without_building_the_pytorch_model(r50, dynamic_onnx, monkeypatch):
    photo = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    want = zoo.Segmenter(r50, device="cpu", scale_wh=(96, 64))(photo, probs=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the onnxruntime runtime built a PyTorch model")

    monkeypatch.setattr(zoo.ISANet, "__init__", refuse)
    seg = zoo.Segmenter(weights=dynamic_onnx, runtime="onnxruntime", scale_wh=(96, 64))
    assert isinstance(seg.model, OnnxRuntimeModel) and seg.classes == r50.meta.classes
    got = seg(photo, probs=True)
    assert got.shape == want.shape == (19, 50, 70)
    # the PyTorch Segmenter runs the BN-folded copy; the random logits are large, so softmax magnifies
    # their ~1e-6 relative difference to ~1e-4 in probability
    assert float((got - want).abs().max()) < 1e-3
    assert torch.equal(got.argmax(0), want.argmax(0))


def test_isa_predict_with_onnxruntime_writes_masks(r50, dynamic_onnx, tmp_path, capsys):
    rng = np.random.default_rng(1)
    (tmp_path / "photos").mkdir()
    for i, (h, w) in enumerate([(120, 160), (128, 128)]):  # taller than a 19-class legend
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"photos/p{i}.png")
    code = main(["predict", "--runtime", "onnxruntime", "--weights", str(dynamic_onnx), str(tmp_path / "photos"),
                 "--out", str(tmp_path / "out"), "--img-scale", "96", "64", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    mask = np.array(Image.open(tmp_path / "out/p0_mask.png"))
    want = zoo.Segmenter(r50, device="cpu", scale_wh=(96, 64))(str(tmp_path / "photos/p0.png")).numpy()
    assert mask.shape == (120, 160) and (mask == want).mean() > 0.999
    assert (tmp_path / "out/p1_overlay.png").is_file()


def test_static_onnx_in_the_test_pipeline_says_to_export_dynamic(static_onnx):
    seg = zoo.Segmenter(weights=static_onnx, runtime="onnxruntime", scale_wh=(96, 64))
    with pytest.raises(ValueError, match="--dynamic"):
        seg(np.zeros((40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": "model.safetensors"}, "exported .onnx file"),
    ({"weights": "model.onnx", "device": "cuda"}, "on the CPU"),
    ({"weights": "model.onnx", "dtype": "bfloat16"}, "float32"),
    ({"weights": "model.onnx", "num_classes": 3}, "classifier"),
])
def test_segmenter_onnxruntime_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoo.Segmenter(runtime="onnxruntime", **kwargs)


# --------------------------------------------------------------------------------------------------
# AOTInductor package

_LOADER = r"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError("the project must not be imported: " + name)

sys.meta_path.insert(0, Refuse())
import torch
package, x_path, out_path = sys.argv[1:]
runner = torch._inductor.aoti_load_package(package)
torch.save(runner(torch.load(x_path)), out_path)
assert not any(name.split(".")[0] in {packages!r} for name in sys.modules)
print("ok")
"""


def run_package_elsewhere(package: Path, x: torch.Tensor, folder: Path) -> torch.Tensor:
    """Run a .pt2 in a fresh interpreter that cannot import this project (isolated mode, another cwd)."""
    torch.save(x, folder / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", "-c", _LOADER.format(packages=PROJECT_PACKAGES), str(package),
                           str(folder / "x.pt"), str(folder / "out.pt")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    return torch.load(folder / "out.pt")


def test_pt2_package_loads_without_the_project_and_matches_pytorch(r50, tmp_path):
    package = export_model(r50, tmp_path / "r50.pt2", size=(65, 97))
    x = images((1, 3, 65, 97), seed=4)
    assert_matches(run_package_elsewhere(package, x, tmp_path), torch_logits(r50, x))
    sidecar = json.loads(sidecar_path(package).read_text())
    assert sidecar_path(package).name == "r50.json" and sidecar["export_format"] == "pt2"
    assert same_meta(ModelMeta.from_metadata(sidecar), r50.meta)


@pytest.mark.slow
def test_dynamic_pt2_package_runs_at_sizes_it_was_not_traced_at(r50, tmp_path):
    package = export_model(r50, tmp_path / "r50.pt2", size=(64, 64), dynamic=True)
    runner = torch._inductor.aoti_load_package(str(package))
    for shape in [(1, 3, 64, 64), (2, 3, 65, 97), (1, 3, 72, 64)]:
        x = images(shape, seed=5)
        assert_matches(runner(x), torch_logits(r50, x))


# --------------------------------------------------------------------------------------------------
# bad input: a clear message, nothing half-written


def export_cli(tmp_path, *args: str) -> int:
    return main(["export", R50, "--weights", "none", *args])


@pytest.mark.parametrize("args,message", [
    (["--size", "16x64", "--out", "m.onnx"], "at least 32"),
    (["--size", "64x64", "--out", "m.tflite"], "end it with .onnx or .pt2"),
    (["--size", "64x64", "--format", "pt2", "--out", "m.onnx"], "must end with .pt2"),
    (["--size", "64x64", "--backend", "triton", "--out", "m.onnx"], "triton attention backend cannot be exported"),
])
def test_export_refuses_bad_arguments_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(zoo, "create_model", lambda *a, **k: pytest.fail("built a model for a bad command"))
    assert export_cli(tmp_path, *args) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_unknown_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", R50, "--format", "tflite", "--size", "64x64", "--out", "m.tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_failed_onnx_export_leaves_the_previous_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", fail)
    assert export_cli(tmp_path, "--size", "64x64", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "ONNX export (torch.onnx.export) failed: RuntimeError: Unsupported operator" in err
    assert "nothing was written" in err
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_write_that_fails_halfway_leaves_nothing(tmp_path, monkeypatch, capsys):
    class Program:  # what torch.onnx.export returns, with a save that runs out of disk halfway
        class model:
            metadata_props: dict = {}

        def save(self, path, **kwargs):
            Path(path).write_bytes(b"half a model")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    out = tmp_path / "m.onnx"
    assert export_cli(tmp_path, "--size", "64x64", "--out", str(out)) == 1
    assert "no space left on the device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_pt2_compilation_leaves_neither_package_nor_metadata(tmp_path, monkeypatch, capsys):
    def compile_halfway(program, package_path, **kwargs):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: object())
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_halfway)
    assert export_cli(tmp_path, "--size", "64x64", "--out", str(tmp_path / "m.pt2")) == 1
    assert "AOTInductor compilation (aoti_compile_and_package) failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
