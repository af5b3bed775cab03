"""train.losses against MMSegmentation 1.2.2 itself (values and gradients written by
tools/mmseg_loss_reference.py in the side environment) and against hand computations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from train.losses import build_loss, parse_loss_spec

REFERENCE = Path(__file__).parent / "data" / "mmseg_losses" / "reference.safetensors"
RTOL = 1e-6


def _reference():
    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    return load_file(str(REFERENCE)), json.loads(meta["cases"]), meta


TENSORS, CASES, META = _reference()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_loss_and_the_ohem_sampler_equal_mmsegmentation_1_2_2_forward_and_gradient(name):
    assert META["mmseg_version"] == "1.2.2"
    case = CASES[name]
    dtype = getattr(torch, case["dtype"])
    labels = TENSORS["labels"]
    x = TENSORS["logits"].clone().requires_grad_(True)
    criterion = build_loss(case["spec"], num_classes=x.shape[1], ohem=case["ohem"])
    out = criterion(x.to(dtype), labels)
    terms = case["terms"]
    if terms == ["loss"]:  # one term: its name is the loss module's
        assert len(out) == 1
        got = {"loss": next(iter(out.values()))}
    else:
        got = out
    assert sorted(got) == terms
    for key in terms:
        want = TENSORS[f"{name}.{key}"]
        assert got[key].item() == pytest.approx(want.item(), rel=RTOL), (name, key)
    sum(got.values()).backward()
    grad_rel = _rel(x.grad, TENSORS[f"{name}.grad"])
    print(f"{name}: value rel {max(abs(got[k].item() / TENSORS[f'{name}.{k}'].item() - 1) for k in terms):.1e}, "
          f"gradient max-abs / max {grad_rel:.1e}")
    assert grad_rel < RTOL, name
    if case["ohem"] is not None:
        weight = criterion.sampler.sample(TENSORS["logits"], labels, list(criterion.losses))
        assert torch.equal(weight, TENSORS[f"{name}.weight"].to(weight.dtype))


def test_the_weighted_cross_entropy_with_ignored_pixels_is_the_class_weighted_mean_over_labelled_pixels():
    """PR #3457's intent, independently: PyTorch's own weighted mean (sum w[y] l / sum w[y], ignored left out)."""
    x, labels = TENSORS["logits"], TENSORS["labels"]
    cw = TENSORS["class_weight"]
    want = F.cross_entropy(x, labels, weight=cw, ignore_index=255)
    for avg in (False, True):
        got = build_loss("ce", 4, class_weight=cw.tolist(), avg_non_ignore=avg)(x, labels)["loss_ce"]
        # (mmseg divides by the weight sum + float32 eps: 1e-9 relative here)
        assert got.item() == pytest.approx(want.item(), rel=1e-8)


def test_softmax_dice_by_hand():
    """The short name `dice`: softmax, ignored pixels out, per class over the batch, mean over present classes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 4, 5), generator=g)  # class 2 absent
    labels[0, 0, :] = 255
    p = x.softmax(1)
    total = 0.0
    for c in (0, 1):
        inter = psum = tsum = 0.0
        for n in range(2):
            for i in range(4):
                for j in range(5):
                    if labels[n, i, j] == 255:
                        continue
                    t = float(labels[n, i, j] == c)
                    inter += float(p[n, c, i, j]) * t
                    psum += float(p[n, c, i, j])
                    tsum += t
        total += 1 - (2 * inter + 1.0) / (psum + tsum + 1.0)
    got = build_loss("dice:2.5", 3)(x, labels)["loss_dice"]
    assert got.item() == pytest.approx(2.5 * total / 2, rel=1e-12)


def test_loss_spec_spellings_and_errors():
    assert parse_loss_spec("ce:1.0 dice:3") == [{"type": "CrossEntropyLoss", "loss_weight": 1.0},
                                                {"type": "SoftmaxDiceLoss", "loss_weight": 3.0}]
    assert parse_loss_spec(["focal", "lovasz:0.5"])[1] == {"type": "LovaszLoss", "loss_weight": 0.5}
    assert parse_loss_spec({"type": "DiceLoss", "naive_dice": True}) == [{"type": "DiceLoss", "naive_dice": True}]
    with pytest.raises(ValueError, match="NAME\\[:WEIGHT\\]"):
        parse_loss_spec("crossentropy:1")
    with pytest.raises(ValueError, match="no option"):
        build_loss({"type": "DiceLoss", "smooth": 1}, 3)
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        build_loss("ce", 4, class_weight=[1, 2, 3])
    with pytest.raises(ValueError, match="ohem"):
        build_loss("ce dice", 4, ohem=(0.7, 100))
    with pytest.raises(ValueError, match="threshold"):
        build_loss("ce lovasz", 4, ohem=(None, 100))
    # two terms of one name add up, as in MMSegmentation's decode head
    x, labels = TENSORS["logits"], TENSORS["labels"]
    two = build_loss("ce:1 ce:2", 4)(x, labels)["loss_ce"]
    one = build_loss("ce:3", 4)(x, labels)["loss_ce"]
    assert two.item() == pytest.approx(one.item(), rel=1e-12)


def test_warmup_factor_is_mmengines_linear_lr():
    """--warmup's factor against mmengine's own LinearLR (written by the reference tool)."""
    from train.optim import warmup_factor

    want = TENSORS["linear_lr.start0.1_end5"].tolist()
    assert [warmup_factor(t, 5, 0.1) for t in range(8)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("spec, match", [
    ({"type": "FocalLoss", "alpha": [0.25, 0.75]}, r"FocalLoss: alpha has 2 values .* for 3 classes"),
    ({"type": "LovaszLoss", "classes": [0, 3]}, r"LovaszLoss: classes \[3\] are out of range for 3 classes"),
    ({"type": "LovaszLoss", "classes": [-1, 1]}, r"LovaszLoss: classes \[-1\] are out of range"),
])
def test_per_class_options_that_do_not_fit_the_class_count_are_refused_before_training(spec, match):
    with pytest.raises(ValueError, match=match):
        build_loss([spec], num_classes=3)
    # a module made directly says the same at its first call instead of indexing out of range / broadcasting
    from train.losses import LOSS_TYPES

    module = LOSS_TYPES[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})
    with pytest.raises(ValueError, match=match.split(" \\[")[0].split(" has")[0]):
        module(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["ce", "focal", "lovasz"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_nan_infinite_or_negative_class_weights_are_named(kind, bad):
    with pytest.raises(ValueError, match=rf"class weight 1 is {bad}; class weights must be finite and >= 0"):
        build_loss(kind, num_classes=3, class_weight=[1.0, bad, 2.0])


@pytest.mark.parametrize("text", ["[1.0, NaN, 2.0]", "1 -2 3", "[1, Infinity, 1]"])
def test_class_weights_files_with_nan_infinite_or_negative_values_are_refused(tmp_path, text):
    from train.tuning import resolve_class_weights

    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"--class-weights {path}: .*finite and >= 0"):
        resolve_class_weights(str(path), None, 3, ["a", "b", "c"])
