"""`isa train` arguments: recipes reproduce variants.json, fine-tuning defaults, clear errors."""
from __future__ import annotations

import argparse

import pytest

import zoo
from isa.training import add_arguments, add_parser, config_from_args
from train import TrainConfig


def _args(*argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_recipe_takes_dataset_crop_iterations_batch_and_intervals_from_the_variant(name):
    vc = zoo.get_config(name)
    cfg = config_from_args(_args("--recipe", name, "--data-root", "data", "--backbone-weights", "r.pth"))
    assert (cfg.model, cfg.recipe, cfg.data_root) == (name, name, "data")
    assert cfg.crop_size == tuple(vc.crop_size_hw) and cfg.img_scale == tuple(vc.train_img_scale_wh)
    assert cfg.iters == vc.iters and cfg.batch_size == vc.total_batch_size == vc.samples_per_gpu * vc.gpus
    assert cfg.eval_interval == cfg.checkpoint_interval == vc.iters // 10
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.power, cfg.min_lr) == (0.01, 0.9, 0.0005, 0.9, 1e-4)
    assert cfg.ratio_range == (0.5, 2.0) and cfg.cat_max_ratio == 0.75 and cfg.aux_weight == 0.4
    assert cfg.avg_non_ignore is False and cfg.amp is None and cfg.weights is None
    split = {"cityscapes": "train", "ade20k": "train"}.get(vc.dataset, "train+aug")
    assert cfg.train_split == split and cfg.val_split == "val"


def test_recipe_overrides_and_finetune_defaults():
    cfg = config_from_args(_args("--recipe", "isanet_r50-d8_512x1024_40k_cityscapes", "--data-root", "d",
                                 "--batch-size", "4", "--iters", "100", "--amp", "bf16", "--avg-non-ignore"))
    assert (cfg.batch_size, cfg.iters, cfg.amp, cfg.avg_non_ignore, cfg.dataset) == (4, 100, "bf16", True,
                                                                                      "cityscapes")
    cfg = config_from_args(_args("--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "mine", "--iters", "50",
                                 "--crop-size", "256", "320", "--batch-size", "2", "--work-dir", "out",
                                 "--num-classes", "4", "--lr", "0.001", "--checkpoint-interval", "10"))
    assert (cfg.dataset, cfg.data_root, cfg.weights, cfg.num_classes) == ("folder", "mine", "auto", 4)
    assert cfg.crop_size == (256, 320) and cfg.img_scale == (1280, 256)
    assert (cfg.iters, cfg.batch_size, cfg.lr, cfg.checkpoint_interval, cfg.eval_every) == (50, 2, 0.001, 10, 50)


@pytest.mark.parametrize("iters, every", [(10, 50), (40, 50), (500, 50), (2000, 200), (40000, 4000)])
def test_short_runs_evaluate_and_checkpoint_at_most_every_50_iterations(iters, every):
    cfg = config_from_args(_args("--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "d", "--iters", str(iters)))
    assert cfg.eval_every == cfg.checkpoint_every == every
    assert config_from_args(_args("--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "d", "--iters", "10",
                                  "--eval-interval", "2")).eval_every == 2  # an explicit interval is kept


def test_keep_checkpoints_defaults_to_2_and_takes_all():
    finetune = ("--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "d")
    assert config_from_args(_args(*finetune)).resolve_keep_checkpoints() == 2  # a fresh run (resumes: their own)
    assert config_from_args(_args(*finetune, "--keep-checkpoints", "all")).keep_checkpoints == 0
    assert config_from_args(_args(*finetune, "--keep-checkpoints", "5")).keep_checkpoints == 5
    with pytest.raises(SystemExit):
        _args(*finetune, "--keep-checkpoints", "-1")


def test_resume_names_each_changed_field_and_allows_schedule_and_logging_changes():
    saved = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", "d", crop_size=(64, 64)).to_dict()
    cfg = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", "./d", crop_size=(64, 96), lr=0.5,
                                   iters=10, log_interval=1, work_dir="elsewhere", resume=True)
    refused, allowed = cfg.resume_differences(saved)
    assert refused == ["crop_size: [64, 64] -> [64, 96]", "img_scale: [256, 64] -> [384, 64]", "lr: 0.01 -> 0.5"]
    assert allowed == ["iters: 2000 -> 10", "log_interval: 10 -> 1"]


@pytest.mark.parametrize("argv, match", [
    (("--recipe", "isanet_r50-d8_512x1024_40k_cityscapes", "--model", "x", "--data-root", "d"), "choose one"),
    (("--data", "d"), "choose one"),
    (("--recipe", "isanet_r50-d8_512x1024_40k_cityscapes"), "--data-root"),
    (("--model", "isanet_r50-d8_512x1024_40k_cityscapes"), "--data DIR"),
    (("--model", "isanet_r50-d8_512x1024_40k_cityscapes", "--data", "d", "--data-root", "d"), "--data-root is for"),
])
def test_bad_combinations_raise_clear_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        config_from_args(_args(*argv))


def test_unknown_recipe_lists_close_matches():
    with pytest.raises(KeyError, match="Did you mean"):
        TrainConfig.from_recipe("isanet_r50-d8_512x1024_40k_cityscape", "d")


def test_isa_train_is_a_subcommand_of_isa():
    parser = argparse.ArgumentParser(prog="isa")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", "isanet_r50-d8_512x512_80k_ade20k", "--data-root", "ade"])
    assert args.func.__name__ == "run" and args.recipe == "isanet_r50-d8_512x512_80k_ade20k"
    from isa.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "x"])
    assert args.command == "train" and args.model == "isanet_r50-d8_512x512_20k_voc12aug"


def test_recipe_fetches_the_imagenet_backbone_like_mmseg_unless_told_otherwise(caplog):
    recipe = ("--recipe", "isanet_r101-d8_512x512_80k_ade20k", "--data-root", "d")
    assert config_from_args(_args(*recipe)).backbone_weights == "auto"
    assert config_from_args(_args(*recipe, "--weights", "w.safetensors")).backbone_weights is None
    with caplog.at_level("WARNING"):
        assert config_from_args(_args(*recipe, "--backbone-weights", "none")).backbone_weights is None
    assert "random init" in caplog.text and "resnet101_v1c" in caplog.text
    finetune = ("--model", "isanet_r50-d8_512x512_20k_voc12aug", "--data", "x")
    assert config_from_args(_args(*finetune)).backbone_weights is None
    assert config_from_args(_args(*finetune, "--backbone-weights", "none")).backbone_weights is None
