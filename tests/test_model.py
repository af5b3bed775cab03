"""The model against MMSegmentation's key layout and an independent fp64 transcription of ISAHead."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.inference import slide_inference, slide_windows
from zoo.model import ISAHead

KEYS_DIR = Path(__file__).parent / "data" / "mmseg_isanet_keys"


def _reference_keys(name: str):
    rows = [line.split("\t") for line in (KEYS_DIR / f"{name}.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    return [(k, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)
            for k, shape, dtype in rows]


@pytest.mark.parametrize("name", zoo.list_models())
def test_state_dict_keys_shapes_order_match_mmsegmentation(name):
    model = zoo.ISANet(zoo.get_config(name))
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert got == _reference_keys(name)


def test_registry_lists_sixteen_variants_with_published_numbers():
    names = zoo.list_models()
    assert len(names) == 16 and len(set(names)) == 16
    assert zoo.list_models("isanet_r101*voc12aug") == ["isanet_r101-d8_512x512_20k_voc12aug",
                                                        "isanet_r101-d8_512x512_40k_voc12aug"]
    cfg = zoo.get_config("isanet_r50-d8_769x769_40k_cityscapes")
    assert (cfg.test_mode, cfg.test_crop_size_hw, cfg.test_stride_hw) == ("slide", (769, 769), (513, 513))
    assert cfg.align_corners is True and cfg.mIoU == 78.70 and cfg.test_img_scale_wh == (2049, 1025)


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="isanet_r50-d8_512x1024_40k_cityscapes"):
        zoo.create_model("isanet_r50-d8_512x1024_40k_cityscape")


# ----------------------------------------------------------------------------------------------
# Independent fp64 reference: MMSegmentation's ISAHead.forward transcribed from spec §1.3-1.4,
# permute for permute, with BN written out as its formula.

def _bn(x, bn):
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) \
        * bn.weight.view(shape) + bn.bias.view(shape)


def _conv_module(x, m, padding=0):
    return torch.relu(_bn(F.conv2d(x, m.conv.weight, padding=padding), m.bn))


def _sab_reference(x, block):
    """mmseg SelfAttentionBlock.forward(x, x) with ISA's options, on (B, C, h, w)."""
    b = x.shape[0]
    q = _conv_module(_conv_module(x, block.query_project[0]), block.query_project[1])
    k = _conv_module(_conv_module(x, block.key_project[0]), block.key_project[1])
    v = F.conv2d(x, block.value_project.weight, block.value_project.bias)
    q = q.reshape(b, q.shape[1], -1).permute(0, 2, 1)
    k = k.reshape(b, k.shape[1], -1)
    v = v.reshape(b, v.shape[1], -1).permute(0, 2, 1)
    sim = torch.matmul(q, k) * (block.channels ** -0.5)
    sim = F.softmax(sim, dim=-1)
    ctx = torch.matmul(sim, v).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
    return _conv_module(ctx, block.output_project)


def _isa_head_reference(feat, head: ISAHead):
    x = _conv_module(feat, head.in_conv, padding=1)
    residual = x
    n, c, h, w = x.shape
    loc_h, loc_w = head.down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h > 0 or pad_w > 0:
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        x = F.pad(x, padding)
    # global relation
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w)
    x = x.permute(0, 3, 5, 1, 2, 4)  # (n, loc_h, loc_w, c, glb_h, glb_w)
    x = x.reshape(-1, c, glb_h, glb_w)
    x = _sab_reference(x, head.global_relation)
    # local relation
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w)
    x = x.permute(0, 4, 5, 3, 1, 2)  # (n, glb_h, glb_w, c, loc_h, loc_w)
    x = x.reshape(-1, c, loc_h, loc_w)
    x = _sab_reference(x, head.local_relation)
    # permute each pixel back to its original position
    x = x.view(n, glb_h, glb_w, c, loc_h, loc_w)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (n, c, glb_h, loc_h, glb_w, loc_w)
    x = x.reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    if pad_h > 0 or pad_w > 0:
        x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
    x = _conv_module(torch.cat([x, residual], dim=1), head.out_conv)
    return F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)


def _randomise_bn(module, generator):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0, 0.5, generator=generator)


def _small_head(block=(8, 8)):
    """A narrow ISA head (same code, fewer channels) so fp64 runs stay fast."""
    g = torch.Generator().manual_seed(0)
    head = ISAHead(num_classes=5, in_channels=24, channels=16, isa_channels=8, down_factor=block,
                   backend="eager")
    _randomise_bn(head, g)
    return head.eval().double()


@pytest.mark.parametrize("h,w", [(16, 24), (13, 21), (14, 19), (9, 9), (8, 31)])
def test_isa_head_matches_fp64_mmseg_transcription(h, w):
    """Exact padding (odd pixel bottom/right), permutation orders and concat order."""
    head = _small_head()
    feat = torch.randn(2, 24, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    feats = (None, None, None, feat)
    with torch.no_grad():
        got = head(feats)
        want = _isa_head_reference(feat, head)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_isa_head_non_square_block_matches_reference():
    head = _small_head(block=(4, 8))
    feat = torch.randn(1, 24, 11, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(head((None,) * 3 + (feat,)), _isa_head_reference(feat, head),
                                   rtol=1e-10, atol=1e-10)


def test_padding_changes_the_answer_so_the_reference_test_can_fail():
    """Guard: masking or mis-placing padding would be caught (swapped split differs)."""
    head = _small_head()
    feat = torch.randn(1, 24, 13, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _isa_head_reference(feat, head)
        shifted = F.pad(feat, (1, 0, 1, 0))[:, :, :13, :13]
        assert (head((None,) * 3 + (shifted,)) - want).abs().max() > 1e-3


def test_eval_forward_returns_logits_at_input_size_and_train_returns_two_heads():
    model = zoo.create_model("isanet_r50-d8_512x512_80k_ade20k", num_classes=3)
    x = torch.randn(2, 3, 33, 47)
    model.train()
    dec, aux = model(x)
    assert dec.shape == (2, 3, 5, 6) and aux.shape == (2, 3, 5, 6)  # ceil(33/8), ceil(47/8)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 33, 47)
    assert model.predict(x).shape == (2, 33, 47)


@pytest.mark.parametrize("shape,match", [
    ((1, 1, 64, 64), "grey"), ((1, 4, 64, 64), "alpha"), ((3, 64, 64), "unsqueeze"),
    ((1, 3, 31, 64), "at least 32"), ((1, 3, 64, 16), "at least 32"),
])
def test_bad_inputs_get_clear_errors(shape, match):
    model = zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes").eval()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_integer_input_is_refused():
    model = zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes").eval()
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_slide_windows_for_the_769_test_image():
    boxes = slide_windows(1025, 2049, (769, 769), (513, 513))
    assert len(boxes) == 8
    assert sorted({b[0] for b in boxes}) == [0, 256] and sorted({b[2] for b in boxes}) == [0, 513, 1026, 1280]
    assert all(y2 - y1 == 769 and x2 - x1 == 769 for y1, y2, x1, x2 in boxes)
    assert boxes[-1] == (256, 1025, 1280, 2049)


def test_slide_window_larger_than_image_is_not_padded():
    assert slide_windows(500, 600, (769, 769), (513, 513)) == [(0, 500, 0, 600)]


def test_slide_inference_averages_logits_by_window_count():
    """A position-encoding fn makes every window's contribution checkable by hand."""
    x = torch.zeros(1, 1, 10, 14)
    fn = lambda t: torch.ones(1, 1, *t.shape[2:])  # noqa: E731 — each window adds 1
    out = slide_inference(fn, x, (6, 6), (4, 4))
    torch.testing.assert_close(out, torch.ones(1, 1, 10, 14))
    counted = slide_inference(lambda t: torch.full((1, 1, *t.shape[2:]), float(t.shape[-1])), x, (6, 6), (4, 4))
    assert torch.all(counted == 6)
