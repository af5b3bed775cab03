"""Issue 21's fine-tuning options in the training loop: the recipe unchanged without them, accumulation,
freezing, class weights, optimizer groups and warm-up, TensorBoard, the CLI and check-data's hint."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train.engine as engine
from train import TrainConfig
from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)  # an R-50 training checkpoint is ~300 MB


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=4, num_val=2, size_hw=(72, 80))


def _cfg(data, work, **kw):
    base = dict(work_dir=str(work), iters=3, crop_size=(32, 32), batch_size=2, weights="none", device="cpu",
                progress=False, val_split=None, threads=1, seed=5, check_data=False)
    base.update(kw)
    return TrainConfig.for_finetune(MODEL, str(data), **base)


def _weights(result):
    return load_file(result["weights"])


def _initial_state(cfg):
    from zoo import create_model

    torch.manual_seed(cfg.seed)
    return create_model(MODEL, weights=None, num_classes=3, backend=cfg.backend)


def test_a_run_without_the_new_options_is_the_plain_recipe_computed_by_hand(tmp_path, data):
    """3 iterations through `train` equal, bit for bit, the recipe written out with torch.nn.functional
    (bilinear upsampling, cross-entropy mean over all pixels, decode + 0.4 aux), torch.optim.SGD
    (0.01 / 0.9 / 5e-4) and the poly formula set by hand each iteration: the options change nothing by default."""
    from train.builders import build_datasets
    from train.data import IterationBatchSampler, TrainSet, build_loader
    from train.pipeline import RecipePipeline, normalize_batch

    cfg = _cfg(data, tmp_path / "run").validate()
    result = engine.train(cfg)

    torch.set_num_threads(1)
    model = _initial_state(cfg)
    train_set, _ = build_datasets(cfg)
    sampler = IterationBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed)
    loader = iter(build_loader(TrainSet(train_set, RecipePipeline(cfg.crop_size, cfg.img_scale, cfg.ratio_range,
                                                                  cfg.cat_max_ratio)), sampler, num_workers=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(cfg.seed + 1)  # the loop's dropout stream
    model.train()
    for t in range(3):
        for group in opt.param_groups:
            group["lr"] = (0.01 - 1e-4) * (1 - t / 3) ** 0.9 + 1e-4
        images, labels = next(loader)
        images, labels = normalize_batch(images, labels, model.config.mean, model.config.std)
        decode, aux = model(images)
        labels = labels[:, 0] if labels.dim() == 4 else labels
        total = 0
        for logits, w in ((decode, 1.0), (aux, 0.4)):
            full = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            ce = F.cross_entropy(full, labels.long(), ignore_index=255, reduction="none").mean()
            total = total + (ce * w if w != 1.0 else ce)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    got = _weights(result)
    want = model.state_dict()
    different = [k for k in got if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    config = json.loads(Path(result["config"]).read_text())
    assert config["loss"] is None and config["class_weight_values"] is None and config["accum_steps"] == 1


def _update_rel(a, b, w0):
    """|(a - w0) - (b - w0)| / |b - w0| over all float parameters together."""
    num = den = 0.0
    for k, v in w0.items():
        if not v.is_floating_point() or "running_" in k:
            continue
        da, db = a[k].double() - v.double(), b[k].double() - v.double()
        num += float(((da - db) ** 2).sum())
        den += float((db ** 2).sum())
    return math.sqrt(num / den)


def test_accumulating_2x2_with_frozen_bn_equals_one_batch_of_4(tmp_path, data):
    common = dict(iters=2, freeze_bn=True, dropout=0.0)
    a = engine.train(_cfg(data, tmp_path / "a", batch_size=2, accum_steps=2, **common))
    b = engine.train(_cfg(data, tmp_path / "b", batch_size=4, **common))
    w0 = {k: v for k, v in _initial_state(_cfg(data, tmp_path)).state_dict().items()}
    wa, wb = _weights(a), _weights(b)
    rel = _update_rel(wa, wb, w0)
    print(f"2x2 vs 1x4 update rel-L2 {rel:.2e}")
    assert rel < 1e-5
    # frozen BN: statistics and affine never moved
    for k, v in w0.items():
        if ".bn" in k or "running_" in k or k.endswith(("stem.1.weight", "stem.1.bias")):
            assert torch.equal(wa[k], v), k
    assert json.loads(Path(a["config"]).read_text())["effective_batch_size"] == 4


def _cmd(data, work, *extra):
    return [sys.executable, "-m", "isa", "train", "--model", MODEL, "--data", str(data), "--weights", "none",
            "--iters", "2", "--crop-size", "32", "32", "--batch-size", "1", "--accum-steps", "2", "--device", "cpu",
            "--threads", "1", "--checkpoint-interval", "1", "--eval-interval", "100", "--log-interval", "1",
            "--seed", "3", "--no-progress", "--no-check-data", "--work-dir", str(work), *extra]


def test_sigkill_between_two_micro_batches_then_resume_is_bit_identical(tmp_path, data, child_env):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = subprocess.Popen(_cmd(data, straight), env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    killed = subprocess.run(_cmd(data, crashed), env=child_env(ISA_TRAIN_KILL_AT="micro:2"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (crashed / "model.safetensors").exists()
    # killed after iteration 2's first micro-batch: iteration 1's checkpoint is the newest
    assert [p.name for p in (crashed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["iter_1.pt"]
    resumed = subprocess.run(_cmd(data, crashed, "--resume"), env=child_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    log_a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (crashed / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a if r["mode"] == "train"] == [r["loss"] for r in log_b if r["mode"] == "train"]


def test_freeze_backbone_stages_and_bn(tmp_path, data):
    cfg = _cfg(data, tmp_path / "run", iters=1, freeze_backbone=2)
    w0 = _initial_state(cfg).state_dict()
    w1 = _weights(engine.train(cfg))
    for k, v in w0.items():
        frozen = k.startswith(("backbone.stem.", "backbone.layer1.", "backbone.layer2."))
        if frozen:
            assert torch.equal(w1[k], v), k  # weights and BN statistics
    assert not torch.equal(w1["backbone.layer3.0.conv1.weight"], w0["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(w1["backbone.layer3.0.bn1.running_mean"], w0["backbone.layer3.0.bn1.running_mean"])


def _rare_class_dataset(root: Path) -> Path:
    """A synthetic dataset whose class 2 (disc) covers a small share of the pixels."""
    root = make_synthetic_dataset(root, num_train=3, num_val=1, size_hw=(40, 48))
    for split in ("train", "val"):
        for p in sorted((root / "masks" / split).iterdir()):
            m = np.array(Image.open(p))
            m[m == 2] = 0
            m[:2, :2] = 2  # 4 pixels per image
            Image.fromarray(m).save(p)
    return root


def test_class_weights_auto_median_frequency_printed_stored_and_in_the_weights(tmp_path, caplog):
    import logging

    root = _rare_class_dataset(tmp_path / "rare")
    counts = np.zeros(3)
    for p in (root / "masks" / "train").iterdir():
        m = np.array(Image.open(p))
        counts += [(m == c).sum() for c in range(3)]
    freq = counts / counts.sum()
    want = np.median(freq) / freq  # 3 classes: the median is the middle share
    caplog.set_level(logging.INFO)
    result = engine.train(_cfg(root, tmp_path / "run", iters=1, batch_size=1, class_weights="auto", check_data=True,
                               val_split="val", eval_interval=1))
    config = json.loads(Path(result["config"]).read_text())
    assert config["class_weights"] == "auto"
    assert config["class_weight_values"] == pytest.approx(want.tolist(), rel=1e-12)
    printed = caplog.text
    assert "class weights" in printed and "disc" in printed and f"{want[2]:8.4f}" in printed
    with safe_open(result["weights"], "pt") as f:
        stored = json.loads(f.metadata()["class_weights"])
    assert stored == pytest.approx(want.tolist(), rel=1e-12)
    assert config["loss_terms"]["aux"][0]["loss_weight"] == 0.4


def test_a_class_weight_count_that_is_not_the_class_count_is_refused_before_training(tmp_path, data):
    work = tmp_path / "run"
    with pytest.raises(ValueError, match="2 weights for 3 classes"):
        engine.train(_cfg(data, work, class_weights="1,2"))
    weights_file = tmp_path / "w.json"
    weights_file.write_text("[1, 2, 3, 4]")
    with pytest.raises(ValueError, match="4 weights for 3 classes"):
        engine.train(_cfg(data, work, class_weights=str(weights_file)))
    assert not (work / "checkpoints").is_dir() or not any((work / "checkpoints").iterdir())


def test_optimizer_groups_head_lr_mult_norm_bias_exemption_and_warmup_by_hand():
    from train.optim import build_optimizer, build_scheduler

    model = _initial_state(TrainConfig.for_finetune(MODEL, "x", weights="none"))
    cfg = TrainConfig.for_finetune(MODEL, "x", optimizer="adamw", lr=6e-5, weight_decay=0.01, head_lr_mult=10.0,
                                   no_decay_norm_bias=True, warmup=4, warmup_start_factor=0.1, iters=10).validate()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    norm_names = {f"{m_name}.{p_name}" for m_name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for p_name, _ in m.named_parameters(recurse=False)}
    assert len(norm_names) == 2 * 68
    for name, p in names.items():
        g = by_param[id(p)]
        head = name.startswith(("decode_head.", "auxiliary_head."))
        norm_or_bias = name.endswith(".bias") or name in norm_names
        assert g["lr"] == pytest.approx(6e-4 if head else 6e-5), name
        assert g["weight_decay"] == (0.0 if norm_or_bias else 0.01), name
    sched = build_scheduler(cfg, opt)
    seen = []
    for t in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    poly = [(6e-5 - 1e-4) * (1 - t / 10) ** 0.9 + 1e-4 for t in range(10)]
    factor = [0.1 + 0.9 * min(t, 3) / 3 for t in range(10)]
    assert seen == pytest.approx([p * f for p, f in zip(poly, factor)], rel=1e-12)
    # the recipe: one plain SGD group, poly without warm-up
    recipe = TrainConfig.for_finetune(MODEL, "x").validate()
    sgd = build_optimizer(recipe, model)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    assert type(build_scheduler(recipe, sgd)).__name__ == "PolyLR"


def test_tensorboard_events_hold_losses_lr_and_per_class_metrics(tmp_path, data):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install "
                                              "'isa-triton[tensorboard]'; CI installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = engine.train(_cfg(data, tmp_path / "run", iters=2, val_split="val", eval_interval=2, log_interval=1,
                               tensorboard=True, loss="ce:1.0 dice:0.5"))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/decode.loss_ce", "train/decode.loss_dice", "train/aux.loss_ce",
            "val/mIoU", "val/IoU/background", "val/IoU/square", "val/IoU/disc"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    logged = [json.loads(x) for x in Path(result["log"]).read_text().splitlines()]
    assert acc.Scalars("train/loss")[1].value == pytest.approx(logged[1]["loss"], rel=1e-6)
    assert acc.Scalars("val/mIoU")[0].value == pytest.approx(result["metrics"]["mIoU"], rel=1e-6)


def test_without_tensorboard_the_run_stops_with_an_install_hint(tmp_path, data, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(ValueError, match=r"pip install 'isa-triton\[tensorboard\]'"):
        engine.train(_cfg(data, tmp_path / "run", tensorboard=True))


def test_cli_flags_reach_the_config_and_a_changed_loss_refuses_resume():
    from isa.cli import build_parser
    from isa.training import config_from_args

    args = build_parser().parse_args(
        ["train", "--model", MODEL, "--data", "d", "--loss", "ce:1.0", "dice:3.0", "--ohem", "0.6", "5000",
         "--class-weights", "auto", "--freeze-bn", "--freeze-backbone", "--accum-steps", "4", "--optimizer", "adamw",
         "--no-decay-norm-bias", "--warmup", "100", "--head-lr-mult", "10", "--tensorboard"])
    cfg = config_from_args(args).validate()
    assert (cfg.loss, cfg.ohem, cfg.class_weights, cfg.freeze_bn, cfg.freeze_backbone, cfg.accum_steps) == \
        ("ce:1.0 dice:3.0", [0.6, 5000], "auto", True, 4, 4)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.no_decay_norm_bias, cfg.warmup, cfg.head_lr_mult,
            cfg.tensorboard) == ("adamw", 6e-5, 0.01, True, 100, 10.0, True)
    plain = config_from_args(build_parser().parse_args(["train", "--model", MODEL, "--data", "d", "--ohem"]))
    assert plain.ohem == [0.7, 100000] and plain.loss is None and plain.optimizer == "sgd"
    saved = cfg.to_dict()
    changed = TrainConfig(**{**cfg.to_dict(), "loss": "ce:1.0", "tensorboard": False})
    refused, allowed = changed.resume_differences(saved)
    assert any(r.startswith("loss:") for r in refused) and any(a.startswith("tensorboard:") for a in allowed)


def test_check_data_flags_a_class_under_0_1_percent_and_suggests_class_weights(tmp_path):
    from eval.checks import check_dataset

    root = make_synthetic_dataset(tmp_path / "d", num_train=2, num_val=1, size_hw=(48, 64))
    for p in (root / "masks" / "train").iterdir():
        m = np.array(Image.open(p))
        m[m == 2] = 0
        Image.fromarray(m).save(p)
    m = np.array(Image.open(root / "masks" / "train" / "img_000.png"))
    m[0, 0] = 2  # 1 pixel of 6144: 0.016 %
    Image.fromarray(m).save(root / "masks" / "train" / "img_000.png")
    report = check_dataset(root, ["train"])
    rare = [w for w in report.warnings if "'disc'" in w]
    assert rare and "--class-weights auto" in rare[0] and "0.1%" in rare[0]
    common = make_synthetic_dataset(tmp_path / "e", num_train=2, num_val=1, size_hw=(48, 64))
    assert not [w for w in check_dataset(common, ["train"]).warnings if "--class-weights" in w]


@pytest.mark.slow
def test_two_processes_accumulating_with_frozen_bn_equal_one_process_with_the_whole_batch(tmp_path, data, child_env):
    """torchrun, 2 ranks x batch 2 x --accum-steps 2 (no_sync on the first micro-batch) against one process
    with batch 8: the same 8 samples, the same update to fp32 rounding."""
    common = ["-m", "isa", "train", "--model", MODEL, "--data", str(data), "--weights", "none", "--iters", "1",
              "--crop-size", "32", "32", "--device", "cpu", "--threads", "1", "--dropout", "0", "--seed", "0",
              "--freeze-bn", "--no-progress", "--no-check-data"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common, "--batch-size", "4", "--accum-steps", "2", "--work-dir", str(tmp_path / "two")],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, *common, "--batch-size", "8", "--work-dir", str(tmp_path / "one")],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    w0 = _initial_state(_cfg(data, tmp_path, seed=0)).state_dict()
    a = load_file(str(tmp_path / "two" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    rel = _update_rel(a, b, w0)
    print(f"2 ranks x 2 x 2 vs 1 x 8: update rel-L2 {rel:.2e}")
    assert rel < 1e-5


def test_class_weights_from_a_file_or_a_list_and_bad_values_named(tmp_path):
    from train.tuning import median_frequency_weights, resolve_class_weights

    cfg = TrainConfig.for_finetune(MODEL, str(tmp_path))
    names = ["a", "b", "c"]
    (tmp_path / "w.txt").write_text("0.5 1\n2\n")
    (tmp_path / "w.json").write_text("[0.5, 1, 2]")
    assert resolve_class_weights(str(tmp_path / "w.txt"), cfg, 3, names) == [0.5, 1.0, 2.0]
    assert resolve_class_weights(str(tmp_path / "w.json"), cfg, 3, names) == [0.5, 1.0, 2.0]
    assert resolve_class_weights("0.5,1,2", cfg, 3, names) == [0.5, 1.0, 2.0]
    assert resolve_class_weights([0.5, 1, 2], cfg, 3, names) == [0.5, 1.0, 2.0]
    assert resolve_class_weights(None, cfg, 3, names) is None
    with pytest.raises(ValueError, match="cannot read class weights"):
        resolve_class_weights("a,b,c", cfg, 3, names)
    with pytest.raises(ValueError, match="finite and >= 0"):
        resolve_class_weights("1,-1,2", cfg, 3, names)
    # by hand: shares 0.6 / 0.3 / 0.1, median 0.3; a class without pixels gets 1.0
    assert median_frequency_weights({0: 600, 1: 300, 2: 100}, 3) == pytest.approx([0.5, 1.0, 3.0])
    assert median_frequency_weights({0: 600, 1: 200}, 3) == pytest.approx([(0.5 * (0.25 + 0.75)) / 0.75,
                                                                         (0.5 * (0.25 + 0.75)) / 0.25, 1.0])


def test_readme_fine_tuning_section_lines_fit_120_characters():
    # the options list was a table whose rows ran to 255 characters; the repository's limit is 120
    text = (REPO / "README.md").read_text()
    start = text.index("### Imbalanced classes, other losses, frozen parts, small GPUs")
    section = text[start:text.index("\n#", start + 4)]
    long = [line[:60] for line in section.splitlines() if len(line) > 120]
    assert not long, long
    for flag in ("--class-weights", "--loss", "--ohem", "--freeze-bn", "--accum-steps", "--optimizer adamw",
                 "--warmup", "--head-lr-mult", "--tensorboard", "mmseg_dice", "frozen_stages", "custom_keys"):
        assert flag in section, flag


def test_tensorboard_after_a_resume_holds_each_iteration_once(tmp_path, data):
    # a run killed after logging iterations 3-4 but before their checkpoint: --resume goes back to iteration 2,
    # log.jsonl drops 3-4 and the resumed run logs them again; TensorBoard must not show them twice
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install "
                                              "'isa-triton[tensorboard]'; CI installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    options = dict(iters=4, checkpoint_interval=2, log_interval=1, tensorboard=True, keep_checkpoints=0)
    engine.train(_cfg(data, work, **options))
    (work / "checkpoints" / "iter_4.pt").unlink()
    result = engine.train(_cfg(data, work, resume=True, **options))
    assert result["iterations"] == 4
    acc = EventAccumulator(str(work / "tensorboard"))
    acc.Reload()
    logged = [r for r in map(json.loads, Path(result["log"]).read_text().splitlines()) if r.get("mode") == "train"]
    assert [r["iter"] for r in logged] == [1, 2, 3, 4]
    points = acc.Scalars("train/loss")
    assert [e.step for e in points] == [1, 2, 3, 4]
    assert [e.value for e in points] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


def test_resume_with_class_weights_auto_keeps_the_runs_weights_when_the_data_changed(tmp_path, data, caplog):
    # exact resume: the loss keeps the weights the run trained with; a recount of changed masks is only reported
    import logging

    root = tmp_path / "data"
    shutil.copytree(data, root)
    work = tmp_path / "run"
    first = engine.train(_cfg(root, work, iters=1, class_weights="auto"))
    trained_with = json.loads(Path(first["config"]).read_text())["class_weight_values"]
    mask_path = sorted((root / "masks" / "train").iterdir())[0]
    mask = Image.open(mask_path)
    zeros = Image.fromarray(np.zeros_like(np.array(mask)), mask.mode)
    if mask.mode == "P":
        zeros.putpalette(mask.getpalette())
    zeros.save(mask_path)  # more background: `auto` would now give other weights
    from train.tuning import resolve_class_weights

    recount = resolve_class_weights("auto", _cfg(root, work), 3, ["background", "square", "disc"])
    assert recount != pytest.approx(trained_with, rel=1e-6)
    caplog.set_level(logging.WARNING)
    second = engine.train(_cfg(root, work, iters=2, class_weights="auto", resume=True))
    assert second["iterations"] == 2
    assert json.loads(Path(second["config"]).read_text())["class_weight_values"] == trained_with
    with safe_open(second["weights"], "pt") as f:
        assert json.loads(f.metadata()["class_weights"]) == trained_with
    said = [r.getMessage() for r in caplog.records if "class-weights auto now gives" in r.getMessage()]
    assert len(said) == 1 and "resuming with the run's weights" in said[0], caplog.text
