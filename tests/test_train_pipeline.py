"""The fast recipe pipeline (train.pipeline) gives the reference pipeline's (train.transforms) pixels for the
same seeds: every draw, window, flip, table and pad compared bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from eval.datasets import ADE20KDataset, CityscapesDataset, DatasetError
from train import native
from train import pipeline as P
from train.decode import decode_image_fast
from train import transforms as T
from train.data import TrainSet, collate

# the "torch" backend is the fallback, which warns that it runs (test_train_native checks the warning)
pytestmark = pytest.mark.filterwarnings("ignore:training data. the native loops are unavailable:RuntimeWarning")

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


@pytest.fixture(params=["native", "native-baseline", "torch"])
def backend(request, monkeypatch):
    """Every implementation of the fast pipeline: train/native.c's loops as built for this machine and
    without tuning, and the PyTorch code that runs where they cannot be built."""
    if request.param == "native":
        if native.library() is None:
            pytest.fail(f"the native loops did not build: {native.why_not()}")
    else:
        lib = request.getfixturevalue("baseline_library") if request.param == "native-baseline" else None
        monkeypatch.setattr(native, "library", lambda: lib)
    return request.param


def _blocky_mask(h, w, classes, block, seed):
    """Large label regions (so the cat_max_ratio check both passes and fails), some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (h // block + 1, w // block + 1), generator=g, dtype=torch.uint8)
    coarse[0, 0] = 255
    return coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].contiguous()


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _reference(image, mask, seed, **kw):
    torch.manual_seed(seed)
    x, y = T.build_train_transforms(**kw)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return x, y.to(torch.int64)


def _fast(image, mask, seed, **kw):
    torch.manual_seed(seed)
    x, y = P.RecipePipeline(**kw)(image, mask)
    assert x.dtype == torch.uint8 and y.dtype == torch.int16
    x, y = P.normalize_batch(x[None], y[None], MEAN, STD)
    return x[0], y[0]


class _Recorder:
    """Wraps CatMaxRandomCrop.choose_box (shared by both paths) to record boxes and checks, and optionally
    pushes the box to a border, keeping the draws (so both paths still draw the same numbers)."""

    def __init__(self, monkeypatch, push=None):
        self.boxes, self.push = [], push
        original = T.CatMaxRandomCrop._draw
        recorder = self

        def draw(crop, h, w):
            top, left, ch, cw = original(crop, h, w)
            if recorder.push == "top_left":
                top, left = 0, 0
            elif recorder.push == "bottom_right":
                top, left = max(h - crop.crop_size_hw[0], 0), max(w - crop.crop_size_hw[1], 0)
            return top, left, min(crop.crop_size_hw[0], h - top), min(crop.crop_size_hw[1], w - left)

        def choose(crop, h, w, window, **kw):
            out = original_choose(crop, h, w, window, **kw)
            recorder.boxes.append((h, w, out["box"], out["checks"]))
            return out

        original_choose = T.CatMaxRandomCrop.choose_box
        monkeypatch.setattr(T.CatMaxRandomCrop, "_draw", draw)
        monkeypatch.setattr(T.CatMaxRandomCrop, "choose_box", choose)


# (image h, w), crop (h, w), scale (w, h), ratio range, flip prob, cat_max_ratio, border push: the recipes'
# geometry at a quarter (Cityscapes) or half (ADE20K) of their size; the full sizes run with -m slow
CASES = [
    ((256, 512), (128, 256), (512, 256), (0.5, 0.5), 0.5, 0.75, None),  # Cityscapes-like at ratio 0.5
    ((256, 512), (128, 256), (512, 256), (2.0, 2.0), 0.5, 0.75, "bottom_right"),  # ratio 2.0, far border
    ((256, 341), (256, 256), (1024, 256), (0.5, 2.0), 1.0, 0.75, "top_left"),  # ADE-like, near border, flip
    ((341, 256), (256, 256), (1024, 256), (0.5, 2.0), 0.0, 0.75, None),  # portrait, no flip
    ((101, 157), (63, 97), (314, 101), (0.5, 2.0), 0.5, 0.75, None),  # odd sizes, odd crop (HSV tails)
    ((37, 53), (64, 64), (53, 37), (0.5, 1.0), 0.5, 0.75, None),  # smaller than the crop: padding
    ((300, 500), (128, 256), (500, 300), (0.5, 2.0), 0.5, 0.75, "bottom_right"),
]
FULL_SIZE = [
    ((1024, 2048), (512, 1024), (2048, 1024), (0.5, 2.0), 0.5, 0.75, None),
    ((512, 683), (512, 512), (2048, 512), (0.5, 2.0), 0.5, 0.75, None),
]


def _ids(cases):
    return [f"{c[0][0]}x{c[0][1]}-r{c[3][0]}-{c[3][1]}-{c[6]}" for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_fast_pipeline_equals_the_reference_for_the_same_seeds(monkeypatch, case, backend):
    _check_case(monkeypatch, case, range(3))  # 7 cases x 3 seeds: 21 seeded draws


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_SIZE, ids=_ids(FULL_SIZE))
def test_fast_pipeline_equals_the_reference_at_the_recipe_sizes(monkeypatch, case, backend):
    _check_case(monkeypatch, case, range(4))


def _check_case(monkeypatch, case, seeds):
    hw, crop, scale, ratios, flip_prob, cat_max, push = case
    image = _image(*hw, seed=hw[1])
    mask = _blocky_mask(*hw, classes=3, block=max(hw) // 6, seed=hw[0])
    rec = _Recorder(monkeypatch, push)
    kw = dict(crop_size_hw=crop, img_scale_wh=scale, ratio_range=ratios, flip_prob=flip_prob, cat_max_ratio=cat_max)
    for seed in seeds:
        ref_x, ref_y = _reference(image, mask, seed, **kw)
        fast_x, fast_y = _fast(image, mask, seed, **kw)
        assert torch.equal(ref_y, fast_y), f"labels differ at seed {seed}"
        different = (ref_x != fast_x).sum().item()
        assert different == 0, f"{different} image values differ at seed {seed}"
    # both paths chose the same boxes; the cases exercise the borders they claim
    ref_boxes, fast_boxes = rec.boxes[0::2], rec.boxes[1::2]
    assert ref_boxes == fast_boxes
    if push == "bottom_right":
        assert all(top + ch == h and left + cw == w for h, w, (top, left, ch, cw), _ in fast_boxes)
    if push == "top_left":
        assert all(box[:2] == (0, 0) for _, _, box, _ in fast_boxes)


def test_fast_pipeline_equals_the_reference_through_cat_max_ratio_redraws(monkeypatch, backend):
    rec = _Recorder(monkeypatch)
    image, mask = _image(256, 512, 1), torch.zeros(256, 512, dtype=torch.uint8)
    mask[:40, :60] = 1  # mostly one class: most boxes fail the check and are redrawn
    kw = dict(crop_size_hw=(128, 256), img_scale_wh=(512, 256))
    for seed in range(2):
        ref, fast = _reference(image, mask, seed, **kw), _fast(image, mask, seed, **kw)
        assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    assert rec.boxes[0::2] == rec.boxes[1::2]
    assert max(checks for *_, checks in rec.boxes) > 1
    x, y = _fast(_image(37, 53, 3), _blocky_mask(37, 53, 3, 9, 4), 0, crop_size_hw=(64, 64), img_scale_wh=(53, 37),
                 ratio_range=(0.5, 1.0))
    assert (y == 255).any() and x.shape == (3, 64, 64)  # padded


@pytest.mark.parametrize("in_hw, out_hw", [((1024, 2048), (2048, 4096)), ((1024, 2048), (512, 1024)),
                                           ((512, 683), (777, 1037)), ((101, 157), (61, 95)), ((90, 120), (90, 120))])
@pytest.mark.parametrize("flip", [False, True])
def test_resize_window_equals_the_window_of_the_full_resize(in_hw, out_hw, flip):
    image = _image(*in_hw, seed=7)
    full = T.resize_image_exact(image, out_hw)
    top, left = out_hw[0] // 3, out_hw[1] // 5
    height, width = min(300, out_hw[0] - top), min(411, out_hw[1] - left)
    want = full[:, top:top + height, left:left + width]
    got = P.resize_window(image, out_hw, top, left, height, width, flip)
    assert torch.equal(got, want.flip(-1) if flip else want)


def test_resize_window_is_the_same_whatever_the_thread_count():
    image = _image(300, 500, seed=8)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((T.resize_image_exact(image, (611, 977)), P.resize_window(image, (611, 977), 0, 0, 611, 977)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][0], outs[0][1])


@pytest.mark.parametrize("width", [64, 53, 31])
@pytest.mark.parametrize("params", [
    {"brightness": 20.7, "contrast_first": True, "contrast": 1.3, "saturation": 0.6, "hue": -18},
    {"brightness": -31.2, "contrast_first": False, "contrast": 0.55, "saturation": 1.4, "hue": 7},
    {"brightness": None, "contrast_first": False, "contrast": None, "saturation": None, "hue": 17},
    {"brightness": None, "contrast_first": True, "contrast": None, "saturation": 1.2, "hue": None},
])
@pytest.mark.parametrize("use_tables", [True, False])
def test_photometric_tables_equal_the_reference_steps(params, width, use_tables):
    img = _image(9, width, seed=width)
    assert torch.equal(P.photometric(img, params, use_tables), T.PhotoMetricDistortion.apply(img, params))


def test_hsv_tables_hold_the_reference_conversions_for_every_colour_sampled():
    to_hsv, to_rgb = P._hsv_tables()
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 4, 64), dtype=torch.uint8, generator=g)
    assert torch.equal(P._unpack(to_hsv[P._pack(rgb)]), T.rgb_to_hsv_uint8(rgb))
    hsv = torch.stack([torch.randint(0, 180, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g),
                       torch.randint(0, 256, (4, 64), generator=g)]).to(torch.uint8)
    assert torch.equal(P._unpack(to_rgb[P._pack(hsv)]), T.hsv_to_rgb_uint8(hsv))


def test_normalize_batch_is_v2_normalize_then_zero_padding():
    images = _image(6, 7, seed=1).unsqueeze(0)
    labels = torch.full((1, 6, 7), 2, dtype=torch.int16)
    labels[:, 4:, :] = P.PAD_LABEL
    labels[:, 0, 0] = 255
    x, y = P.normalize_batch(images, labels, MEAN, STD)
    want = T.build_train_transforms((6, 7), (7, 6))  # only for its Normalize step below
    normalize = [t for t in want.transforms if type(t).__name__ == "Normalize"][0]
    assert torch.equal(x[0, :, :4], normalize(images[0, :, :4].float()))
    assert torch.all(x[0, :, 4:] == 0) and y.dtype == torch.int64
    assert torch.all(y[0, 4:] == 255) and y[0, 0, 0] == 255 and torch.all(y[0, 1:4] == 2)


# ------------------------------------------------------------------------------------------ on disk


def _write_cityscapes(root, sizes):
    for i, (h, w) in enumerate(sizes):
        img_dir, ann_dir = root / "leftImg8bit" / "train" / "c", root / "gtFine" / "train" / "c"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(h, w, i).permute(1, 2, 0).numpy()).save(img_dir / f"c_{i}_leftImg8bit.png")
        mask = _blocky_mask(h, w, 19, 17, i).numpy()
        Image.fromarray(mask).save(ann_dir / f"c_{i}_gtFine_labelTrainIds.png")
    return CityscapesDataset(root, "train")


def _write_ade(root, sizes):
    img_dir, ann_dir = root / "images" / "training", root / "annotations" / "training"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        smooth = torch.nn.functional.interpolate(_image(h // 8 + 1, w // 8 + 1, i)[None].float(), size=(h, w),
                                                 mode="bilinear", align_corners=False)[0]
        Image.fromarray(smooth.round().to(torch.uint8).permute(1, 2, 0).numpy()).save(img_dir / f"a_{i}.jpg",
                                                                                     quality=90)
        raw = _blocky_mask(h, w, 151, 13, i).numpy()
        raw[raw == 255] = 0  # stored 0 is "other": ignored after reduce_zero_label
        Image.fromarray(raw).save(ann_dir / f"a_{i}.png")
    return ADE20KDataset(root, "train")


@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k"])
def test_train_set_fast_path_equals_the_reference_path_from_the_files(tmp_path, dataset, backend):
    if dataset == "cityscapes":
        reader = _write_cityscapes(tmp_path, [(96, 192), (97, 191)])
        kw = dict(crop_size_hw=(48, 96), img_scale_wh=(192, 96))
    else:
        reader = _write_ade(tmp_path, [(120, 161), (161, 120)])  # reduce_zero_label in the reader
        kw = dict(crop_size_hw=(64, 64), img_scale_wh=(256, 64))
    fast = TrainSet(reader, P.RecipePipeline(**kw))
    ref = TrainSet(reader, T.build_train_transforms(**kw))
    for index in range(2):
        for seed in (3, 4):
            x, y = P.normalize_batch(*collate([fast[(index, seed)]]), MEAN, STD)
            want_x, want_y = ref[(index, seed)]
            assert torch.equal(y[0], want_y) and torch.equal(x[0], want_x)
    if dataset == "ade20k":
        assert reader.reduce_zero_label


def test_train_set_fast_path_keeps_the_readers_named_errors(tmp_path, backend):
    reader = _write_cityscapes(tmp_path, [(40, 60), (40, 60)])
    ts = TrainSet(reader, P.RecipePipeline((32, 32), (60, 40)))
    reader.samples[0].image_path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match="corrupt PNG .*c_0_leftImg8bit.png"):
        ts[(0, 1)]
    Image.fromarray(np.zeros((41, 60), np.uint8)).save(reader.samples[1].mask_path)
    with pytest.raises(DatasetError, match="they must match"):
        ts[(1, 1)]


def test_decode_image_fast_reads_jpeg_and_declines_the_rest(tmp_path):
    """torchvision's PNG decoder is not used (it can crash on a corrupt file): PNGs go to PngRows or the reader."""
    from zoo.images import read_image

    rgb = _image(20, 30, 2).permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=85)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert torch.equal(decode_image_fast(tmp_path / "a.jpg"), read_image(tmp_path / "a.jpg"))
    for name in ("a.png", "grey.png", "palette.png"):
        assert decode_image_fast(tmp_path / name) is None
