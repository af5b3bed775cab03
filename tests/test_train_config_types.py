"""TrainConfig holds plain types after validate(): it rides in every checkpoint, read with weights_only=True."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from train import TrainConfig


@pytest.mark.parametrize("weights", [lambda tmp: Path(tmp) / "w.txt", lambda tmp: np.array([1.0, 2.5]),
                                     lambda tmp: (1.0, 2.5)])
def test_class_weights_given_as_path_or_array_keep_checkpoints_loadable(tmp_path, weights):
    (tmp_path / "w.txt").write_text("1 2.5")
    cfg = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", str(tmp_path), work_dir=str(tmp_path),
                                   class_weights=weights(tmp_path), weights=Path(tmp_path) / "init.safetensors")
    saved = cfg.validate().to_dict()
    buffer = io.BytesIO()
    torch.save({"config": saved}, buffer)  # what save_run stores
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["config"]
    assert loaded == saved
    # the same settings compare equal on --resume
    again = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", str(tmp_path), work_dir=str(tmp_path),
                                     class_weights=weights(tmp_path)).validate()
    assert again.resume_differences(loaded)[0] == []


def test_class_weights_that_are_not_numbers_are_named():
    cfg = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", "data", class_weights=[1.0, "x"])
    with pytest.raises(ValueError, match="--class-weights"):
        cfg.validate()


def test_a_resume_without_keep_checkpoints_keeps_what_its_run_kept():
    # a run started with --keep-checkpoints all (or before 2 became the default: its config says 0) and resumed
    # without the flag must not have its checkpoints pruned to 2; an explicit flag still decides
    def cfg(**extra):
        return TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", "data", resume=True, **extra).validate()

    assert cfg().resolve_keep_checkpoints({"keep_checkpoints": 0}) == 0
    assert cfg().resolve_keep_checkpoints({"keep_checkpoints": 7}) == 7
    assert cfg().resolve_keep_checkpoints({}) == 2 and cfg().resolve_keep_checkpoints(None) == 2
    assert cfg(keep_checkpoints=1).resolve_keep_checkpoints({"keep_checkpoints": 0}) == 1
    resumed = cfg()
    resumed.resolve_keep_checkpoints({"keep_checkpoints": 0})
    assert resumed.resume_differences({"keep_checkpoints": 0}) == ([], [])  # nothing to report


def test_adamw_defaults_are_the_same_from_the_cli_finetune_and_trainconfig_and_sgd_keeps_the_recipe():
    import argparse

    from isa.training import add_arguments, config_from_args

    model = "isanet_r50-d8_512x512_20k_voc12aug"
    cli = config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", model, "--data", "d", "--optimizer", "adamw"])).validate()
    python = TrainConfig.for_finetune(model, "d", optimizer="adamw").validate()
    plain = TrainConfig(model, "d", optimizer="adamw").validate()
    recipe = TrainConfig.from_recipe(model, "d", optimizer="adamw").validate()
    for cfg in (cli, python, plain, recipe):  # MMSegmentation's SegFormer AdamW setting, not SGD's 0.01 / 5e-4
        assert (cfg.lr, cfg.weight_decay) == (6e-5, 0.01), (cfg.lr, cfg.weight_decay)
        assert cfg.to_dict()["lr"] == 6e-5 and cfg.to_dict()["weight_decay"] == 0.01  # what config.json records
    # given values win; SGD keeps the recipe's 0.01 / 5e-4 (spec §4) everywhere
    assert TrainConfig.for_finetune(model, "d", optimizer="adamw", lr=1e-4, weight_decay=0.05).lr == 1e-4
    sgd_cli = config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(["--model", model, "--data", "d"]))
    for cfg in (sgd_cli, TrainConfig.for_finetune(model, "d"), TrainConfig.from_recipe(model, "d"),
                TrainConfig(model, "d")):
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("sgd", 0.01, 5e-4)
