"""Every message says what to do in the command line's own terms (issue 20)."""
from __future__ import annotations

import warnings

import pytest

from isa.cli import build_parser, main
from train.synthetic import make_synthetic_dataset
from zoo import Segmenter
from zoo.hub import DownloadError
from zoo.segmenter import pick_runtime

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ISA_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ISA_HUB_URL", "http://127.0.0.1:9/nowhere")  # a closed port: refused at once


def test_segmenter_by_name_loads_the_published_weights_and_says_how_to_get_them_offline(offline):
    with pytest.raises(DownloadError) as info:
        Segmenter(MODEL, device="cpu")  # the default is the published weights, not random ones
    message = str(info.value)
    assert "--weights none" in message and "weights='none'" in message and "copy the file" in message


def test_random_weights_are_an_explicit_choice(offline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg = Segmenter(MODEL, weights="none", device="cpu")  # said on purpose: no warning
    assert seg.num_classes == 21
    with pytest.warns(UserWarning, match="weights='none'"):
        Segmenter(MODEL, weights=None, device="cpu")


def test_isa_download_offline_suggests_a_flag_it_has(offline, capsys):
    assert main(["download", MODEL, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--url URL" in err and "--weights" not in err
    assert "url" in build_parser().parse_args(["download", MODEL, "--url", "http://x/y.pth"])


def test_predict_offline_mentions_weights_none(offline, tmp_path, capsys):
    assert main(["predict", "--model", MODEL, str(tmp_path), "--out-dir", str(tmp_path / "o"), "--device",
                 "cpu"]) == 1
    assert "--weights none" in capsys.readouterr().err


def test_an_exported_file_picks_its_runtime_or_names_the_flag():
    assert pick_runtime("model.onnx") == "onnxruntime" and pick_runtime("model.safetensors") == "torch"
    assert pick_runtime("auto") == "torch" and pick_runtime(None) == "torch"
    with pytest.raises(ValueError, match="--runtime onnxruntime"):
        pick_runtime("model.onnx", "torch")
    with pytest.raises(ValueError, match=r"\.safetensors weights it was exported from"):
        pick_runtime("model.pt2")


def test_data_one_level_too_deep_is_recognised(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "my_data", num_train=1, num_val=1, size_hw=(40, 48))
    for deep in (data / "images", data / "images" / "train"):
        assert main(["train", "--model", MODEL, "--data", str(deep), "--weights", "none", "--device", "cpu",
                     "--work-dir", str(tmp_path / "w")]) == 1
        err = capsys.readouterr().err
        assert f"pass --data {data}" in err, err


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_slowdown(monkeypatch):
    import zoo
    import zoo.segmenter as segmenter

    model = zoo.create_model(MODEL)
    monkeypatch.setattr(segmenter, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated.*slower than float32"):
        Segmenter(model, device="cpu", dtype="bfloat16")
    monkeypatch.setattr(segmenter, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Segmenter(model, device="cpu", dtype="bfloat16")
        Segmenter(model, device="cpu", dtype="float32")


def test_bench_kernels_on_a_cpu_states_the_dtype_it_ran(monkeypatch, capsys):
    import isa.bench

    monkeypatch.setattr(isa.bench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(isa.bench, "cpu_kernel_report", lambda: {"interpreter": {"ok": True}})
    assert main(["bench", "kernels", "--dtype", "bfloat16"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "float32" in first and "--dtype bfloat16 is for the GPU timings" in first


def test_bench_data_times_a_folder_dataset(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "mine", num_train=3, num_val=1, size_hw=(40, 48))
    assert main(["bench", "data", "--data", str(data), "--crop-size", "32", "32", "--samples", "2",
                 "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert '"dataset": "folder"' in out and '"images": 3' in out
    assert main(["bench", "data", "--data-root", str(data)]) == 2  # a benchmark layout needs --recipe
