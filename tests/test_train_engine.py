"""The training loop in-process: the fine-tuning API, NaN stop, weight initialisation paths."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import train.builders as builders
import train.engine as engine
from train import TrainConfig, TrainingDiverged, finetune
from train.synthetic import make_synthetic_dataset

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)  # an R-50 training checkpoint is ~300 MB


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=4, num_val=2, size_hw=(72, 80))


def test_finetune_api_returns_metrics_and_writes_reloadable_weights(tmp_path, data):
    from zoo import create_model

    result = finetune(MODEL, str(data), str(tmp_path / "run"), iters=2, crop_size=(64, 64), batch_size=2,
                      weights=None, device="cpu", progress=False, checkpoint_interval=2, log_interval=1)
    assert result["num_classes"] == 3 and result["classes"] == ["background", "square", "disc"]
    assert result["iterations"] == 2 and math.isfinite(result["final_loss"])
    metrics = result["metrics"]
    assert metrics["mode"] == "val" and metrics["iter"] == 2 and 0 <= metrics["mIoU"] <= 100
    assert result["checkpoint"].endswith("iter_2.pt") and (tmp_path / "run" / "curves.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["mode"] == "train"]
    assert [r["iter"] for r in train_rec] == [1, 2]
    assert {"loss", "decode.loss_ce", "aux.loss_ce", "lr", "time", "memory_mb"} <= set(train_rec[0])
    assert train_rec[0]["lr"] == 0.01 and train_rec[1]["lr"] == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    # the final weights load back into the zoo model for 3 classes
    model = create_model(MODEL, weights=result["weights"], num_classes=3)
    state = torch.load(result["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_nan_loss_stops_the_run_naming_the_iteration_and_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    calls = {"n": 0}
    real = engine.isanet_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(engine, "isanet_loss", poisoned)
    cfg = TrainConfig.for_finetune(MODEL, str(data), work_dir=str(tmp_path / "run"), iters=4, crop_size=(64, 64),
                                   batch_size=2, weights="none", device="cpu", progress=False,
                                   checkpoint_interval=2, val_split=None)
    with pytest.raises(TrainingDiverged) as info:
        engine.train(cfg)
    message = str(info.value)
    assert "iteration 3/4" in message and "nan" in message
    assert str(tmp_path / "run" / "checkpoints" / "iter_2.pt") in message and "--resume" in message


def test_bf16_autocast_run_keeps_a_float32_loss_and_float32_weights(tmp_path, data):
    cfg = TrainConfig.for_finetune(MODEL, str(data), work_dir=str(tmp_path / "run"), iters=1, crop_size=(64, 64),
                                   batch_size=2, weights="none", device="cpu", progress=False, amp="bf16",
                                   val_split=None)
    result = engine.train(cfg)
    assert math.isfinite(result["final_loss"]) and result["metrics"] is None
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["model"]["decode_head.conv_seg.weight"].dtype == torch.float32
    assert state["config"]["amp"] == "bf16"


def test_only_the_classifiers_are_reinitialised_when_the_class_count_differs(tmp_path, data):
    from zoo import create_model
    from zoo.weights import save_weights

    torch.manual_seed(5)
    source = create_model(MODEL)  # 21 classes
    path = tmp_path / "voc.safetensors"
    save_weights(source.state_dict(), path, source.meta)
    cfg = TrainConfig.for_finetune(MODEL, str(data), weights=str(path), device="cpu")
    model = builders.build_model(cfg, num_classes=3)
    src, got = source.state_dict(), model.state_dict()
    for key, value in got.items():
        if "conv_seg" in key:
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, src[key]), key


def test_imagenet_backbone_weights_load_from_mmcv_keys_and_bad_files_name_the_fix(tmp_path):
    from zoo import create_model

    torch.manual_seed(1)
    donor = create_model(MODEL).backbone.state_dict()
    pth = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": {**donor, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}}, pth)
    torch.manual_seed(2)
    model = create_model(MODEL)
    ignored = builders.load_backbone_weights(model, str(pth))
    assert ignored == ["fc.bias", "fc.weight"]
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in donor.items())
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in donor.items() if not k.startswith("layer4")}, broken)
    with pytest.raises(ValueError, match="resnet50_v1c"):
        builders.load_backbone_weights(model, str(broken))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="crop-size"):
        TrainConfig(model=MODEL, data_root="x", crop_size=(16, 16)).validate()
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(model=MODEL, data_root="x", amp="fp8").validate()
