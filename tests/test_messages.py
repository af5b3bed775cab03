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
