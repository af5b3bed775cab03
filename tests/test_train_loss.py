"""Loss averaging (spec §4.3) and the poly schedule (spec §4.2) against hand computations."""
from __future__ import annotations

import io
import math

import pytest
import torch

from train.loss import isanet_loss, seg_cross_entropy
from train.schedule import PolyLR, poly_lr


def _ce_fp64(logits, target):
    """Per-pixel -log softmax[target] in fp64, written out; None where ignored."""
    out = []
    n, k, h, w = logits.shape
    for b in range(n):
        for y in range(h):
            for x in range(w):
                t = int(target[b, y, x])
                if t == 255:
                    out.append(None)
                    continue
                z = [float(logits[b, c, y, x]) for c in range(k)]
                m = max(z)
                out.append(-(z[t] - m - math.log(sum(math.exp(v - m) for v in z))))
    return out


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0, :] = 255
    target[1, 2, 1:4] = 255  # 8 of 30 pixels ignored
    return logits, target


def test_cross_entropy_divides_by_all_pixels_ignored_included_like_mmseg_0x():
    logits, target = _case()
    per_pixel = _ce_fp64(logits, target)
    want = sum(v for v in per_pixel if v is not None) / len(per_pixel)  # 30 pixels, not 22
    got = seg_cross_entropy(logits.float(), target, align_corners=False).item()
    assert got == pytest.approx(want, rel=1e-6)


def test_avg_non_ignore_divides_by_labelled_pixels_only():
    logits, target = _case()
    values = [v for v in _ce_fp64(logits, target) if v is not None]
    got = seg_cross_entropy(logits.float(), target, align_corners=False, avg_non_ignore=True).item()
    assert len(values) == 22 and got == pytest.approx(sum(values) / 22, rel=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_logits_are_upsampled_bilinearly_with_the_variants_align_corners(align_corners):
    g = torch.Generator().manual_seed(1)
    small = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (1, 7, 9), generator=g)
    # bilinear source coordinate of output pixel i for a resize in -> out:
    #   align_corners: i * (in - 1) / (out - 1); otherwise (i + 0.5) * in / out - 0.5, clamped at 0
    def coords(n_out, n_in):
        pts = []
        for i in range(n_out):
            s = i * (n_in - 1) / (n_out - 1) if align_corners else max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(math.floor(s)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            pts.append((lo, hi, s - lo))
        return pts
    big = torch.zeros(1, 3, 7, 9, dtype=torch.float64)
    for y, (y0, y1, fy) in enumerate(coords(7, 2)):
        for x, (x0, x1, fx) in enumerate(coords(9, 3)):
            big[0, :, y, x] = ((1 - fy) * ((1 - fx) * small[0, :, y0, x0] + fx * small[0, :, y0, x1])
                               + fy * ((1 - fx) * small[0, :, y1, x0] + fx * small[0, :, y1, x1]))
    want = sum(_ce_fp64(big, target)) / 63
    got = seg_cross_entropy(small.float(), target, align_corners=align_corners).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_total_is_decode_plus_aux_weighted_by_0_4_and_accuracy_ignores_255():
    logits, target = _case()
    aux = logits.flip(1)
    out = isanet_loss((logits.float(), aux.float()), target, align_corners=False)
    decode_ce = sum(v for v in _ce_fp64(logits, target) if v is not None) / 30
    aux_ce = sum(v for v in _ce_fp64(aux, target) if v is not None) / 30
    assert out["decode.loss_ce"].item() == pytest.approx(decode_ce, rel=1e-6)
    assert out["aux.loss_ce"].item() == pytest.approx(0.4 * aux_ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(decode_ce + 0.4 * aux_ce, rel=1e-6)
    valid = target != 255
    acc = (logits.argmax(1)[valid] == target[valid]).double().mean().item() * 100
    assert out["decode.acc_seg"].item() == pytest.approx(acc, rel=1e-6)


def test_loss_is_computed_in_float32_from_bfloat16_logits():
    logits, target = _case()
    got = seg_cross_entropy(logits.to(torch.bfloat16), target, align_corners=False)
    assert got.dtype == torch.float32


def test_bad_shapes_raise_a_clear_error():
    with pytest.raises(ValueError, match="labels"):
        seg_cross_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long), False)
    with pytest.raises(ValueError, match="model.train"):
        isanet_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), False)


# ------------------------------------------------------------------------------------------ schedule

def test_poly_schedule_sets_each_iterations_lr_per_mmcv_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = PolyLR(opt, max_iters=10, power=0.9, min_lr=1e-4)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])  # the lr iteration t runs with
        opt.step()
        sched.step()
    want = [(0.01 - 1e-4) * (1 - t / 10) ** 0.9 + 1e-4 for t in range(10)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert seen[0] == 0.01 and seen[-1] == pytest.approx(0.0099 * 0.1 ** 0.9 + 1e-4)


def test_poly_lr_published_curve_points():
    # 40k schedule: half way lr = 0.0099 * 0.5**0.9 + 1e-4
    assert poly_lr(20000, 40000) == pytest.approx(0.0099 * 0.5 ** 0.9 + 1e-4)
    assert poly_lr(40000, 40000) == pytest.approx(1e-4)


def test_scheduler_state_round_trips_through_weights_only_load():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01)
    sched = PolyLR(opt, max_iters=100)
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched2 = PolyLR(opt2, max_iters=100)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7 and sched2.get_lr() == pytest.approx([poly_lr(7, 100)])
