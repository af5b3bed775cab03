"""One way in for pixels (zoo.images): the same tensors through train (fast path and ISA_NATIVE=0), eval and
predict, compared with Pillow + ImageOps.exif_transpose directly; hostile files refused by name in every
command, run in child processes (a signal is a failure), with bounded memory; EXIF-rotated phone photos
aligned with masks drawn on the upright view; the fuzz script runs."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from eval.checks import check_dataset
from eval.datasets import DatasetError, FolderDataset, Sample, SegDataset, read_mask
from train import native
from train.data import TrainSet
from train.decode import PngRows, open_image, open_mask
from train.pipeline import RecipePipeline
from zoo.classes import DatasetMeta
from zoo.images import ImageError, probe, read_image, to_rgb_tensor

sys.path.insert(0, str(Path(__file__).parent))
from corpus import label_map, make_corpus, photo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
META = DatasetMeta("folder", ("background", "thing"), ((0, 0, 0), (255, 255, 255)))
GB = 1 << 30


# ------------------------------------------------------------------------------------------ the references

def _pillow_upright(path: Path) -> np.ndarray:
    """The independent reference: Pillow and ImageOps.exif_transpose, as documented (16-bit: the high byte)."""
    with Image.open(path) as pil:
        if pil.mode in ("I;16", "I;16B", "I"):
            grey = (np.asarray(pil).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _files(folder: Path) -> dict:
    """One file per kind the readers must agree on (non-square, so that a transposition shows)."""
    rng = np.random.default_rng(3)
    rgb = photo(rng, 20, 30)
    made = {}

    def save(name, image, **kw):
        made[name] = folder / name
        image.save(made[name], **kw)

    save("rgb.png", Image.fromarray(rgb))
    save("grey.png", Image.fromarray(rgb[..., 1]))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("rgba.png", Image.fromarray(rgb).convert("RGBA"))
    save("grey16.png", Image.fromarray((rgb[..., 0].astype(np.uint16) * 257 + 3)))
    save("rgb_exif6.png", Image.fromarray(rgb), exif=_exif(6))
    for orientation in range(1, 9):
        save(f"o{orientation}.jpg", Image.fromarray(rgb), quality=90, exif=_exif(orientation))
    save("progressive.jpg", Image.fromarray(rgb), quality=80, progressive=True, exif=_exif(6))
    save("grey.jpg", Image.fromarray(rgb[..., 2]), quality=90)
    save("rgb.bmp", Image.fromarray(rgb))
    save("rgb.webp", Image.fromarray(rgb), lossless=True)
    save("lossy.webp", Image.fromarray(rgb), quality=70)
    return made


def _train_image(path: Path, h: int, w: int, tmp: Path) -> tuple:
    """The image the training pipeline is given for this file, and whether the fast path decoded it."""
    mask = tmp / f"{path.stem}_mask.png"
    Image.fromarray(np.zeros((h, w), np.uint8)).save(mask)
    train_set = TrainSet(SegDataset([Sample(path, mask, path.stem)], META), RecipePipeline((8, 8), (16, 16)))
    sources = train_set._sources(0)
    if sources is None:  # what TrainSet then does: the dataset's reader
        return train_set.base[0][0].as_subclass(torch.Tensor), False
    image = sources[0]
    if isinstance(image, PngRows):
        image = image.rows(h).permute(2, 0, 1)
    return image, True


@pytest.mark.parametrize("backend", ["native", "ISA_NATIVE=0"])
def test_every_path_gives_pillows_upright_pixels(tmp_path, monkeypatch, backend):
    if backend == "native":
        assert native.library() is not None, native.why_not()
    else:
        monkeypatch.setattr(native, "library", lambda: None)
    fast = set()
    for name, path in _files(tmp_path).items():
        want = torch.from_numpy(np.array(_pillow_upright(path))).permute(2, 0, 1)
        h, w = want.shape[-2:]
        predict = to_rgb_tensor(path)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "m.png")
        evaluate = SegDataset([Sample(path, tmp_path / "m.png", "x")], META)[0][0].as_subclass(torch.Tensor)
        train, decoded_fast = _train_image(path, h, w, tmp_path)
        for where, got in (("predict", predict), ("eval", evaluate), ("train", train)):
            assert got.dtype == torch.uint8 and torch.equal(got, want), f"{name}: {where} differs from Pillow"
        if decoded_fast:
            fast.add(name)
    jpegs = {f"o{o}.jpg" for o in range(1, 9)} | {"progressive.jpg"}
    # the fast paths really ran: torchvision's JPEG decoder (then turned upright) and, natively, PNG rows
    assert fast == jpegs | ({"rgb.png"} if backend == "native" else set()), fast


def test_masks_read_as_stored_the_same_everywhere_and_lossy_ones_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 3, (12, 17), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "grey.png", exif=_exif(6))  # an orientation tag: masks ignore it
    palette = Image.fromarray(values, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.save(tmp_path / "palette.png")
    Image.fromarray(values).save(tmp_path / "mask.bmp")
    for name in ("grey.png", "palette.png", "mask.bmp"):
        with Image.open(tmp_path / name) as pil:
            want = np.asarray(pil)
        assert np.array_equal(want, values)
        fast = open_mask(tmp_path / name)
        fast = fast.rows(12)[..., 0] if isinstance(fast, PngRows) else fast
        assert torch.equal(fast, torch.from_numpy(values)), name
        assert np.array_equal(read_mask(tmp_path / name), values), name
        assert np.array_equal(read_image(tmp_path / name, "mask"), values), name
    Image.fromarray(values * 100).save(tmp_path / "mask.png", "JPEG", quality=100)  # a JPEG named .png
    rgba = np.stack([values * 100] * 3 + [np.full_like(values, 128)], -1)  # alpha: the extended format (VP8X)
    Image.fromarray(rgba).save(tmp_path / "lossy.webp", quality=100)  # its colour a lossy VP8 stream
    for name, fmt in (("mask.png", "JPEG"), ("lossy.webp", "WEBP")):
        for reader in (read_mask, open_mask, lambda p: read_image(p, "mask")):
            with pytest.raises((ImageError, DatasetError), match=rf"{name} is a lossy {fmt}"):
                reader(tmp_path / name)


def test_png_rows_refuse_a_stream_that_does_not_end_with_the_last_row(tmp_path):
    import zlib

    from corpus import assemble, chunks, encode

    array = label_map(6, 8)
    parts = chunks(encode(array))
    raw = b"".join(b"\x00" + array[r].tobytes() for r in range(6)) + b"\x00" * 9  # 9 bytes past the image
    long = assemble([p for p in parts if p[0] != b"IDAT"][:-1] + [(b"IDAT", zlib.compress(raw)), (b"IEND", b"")])
    (tmp_path / "long.png").write_bytes(long)
    rows = PngRows.open(tmp_path / "long.png")
    assert torch.equal(rows.rows(5)[..., 0], torch.from_numpy(array[:5]))  # the rows a crop reads are right
    with pytest.raises(ValueError, match="long.png.*longer than the image"):
        rows.rows(6)
    with pytest.raises(ImageError, match="long.png.*too long"):
        read_image(tmp_path / "long.png", "mask")


def test_the_pixel_limit_is_one_for_images_and_masks_and_max_pixels_raises_it(tmp_path):
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "i.jpg")
    for path, kind in ((tmp_path / "m.png", "mask"), (tmp_path / "i.jpg", "image")):
        with pytest.raises(ImageError, match=r"40x30 = .*--max-pixels 1200"):
            read_image(path, kind, max_pixels=1000)
        assert tuple(read_image(path, kind, max_pixels=1200).shape[-2:]) == (30, 40)
    with pytest.raises(ImageError, match="--max-pixels 1200"):
        open_image(tmp_path / "i.jpg", max_pixels=1000)
    with pytest.raises(ImageError, match="--max-pixels 1200"):
        PngRows.open(tmp_path / "m.png", max_pixels=1000)
    assert probe(tmp_path / "i.jpg").format == "JPEG" and probe(tmp_path / "m.png").mode == "L"


# ------------------------------------------------------------------------------------------------ EXIF

def _phone_dataset(root: Path, drawn_on: str) -> Path:
    """A phone photo stored sideways (EXIF orientation 6) whose upright view is bright on its left third;
    the mask marks that third, drawn on the upright view (as labelme and CVAT show it) or on the stored
    pixels (misaligned)."""
    upright_h, upright_w = 48, 36
    upright = np.zeros((upright_h, upright_w, 3), np.uint8)
    upright[:, : upright_w // 3] = 230
    mask = np.zeros((upright_h, upright_w), np.uint8)
    mask[:, : upright_w // 3] = 1
    stored = np.rot90(upright, k=1).copy()  # orientation 6 turns it back clockwise
    if drawn_on == "stored":
        mask = np.rot90(mask, k=1).copy()
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.fromarray(stored).save(root / "images" / split / "phone.jpg", quality=95, exif=_exif(6))
        Image.fromarray(mask).save(root / "masks" / split / "phone.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "thing"]}))
    return root


def test_an_upright_labelled_phone_photo_trains_and_evaluates_aligned(tmp_path):
    data = _phone_dataset(tmp_path / "data", "upright")
    report = check_dataset(data)
    assert report.ok, report.format()
    assert any("EXIF orientation" in w and "phone.jpg" in w for w in report.warnings)
    val = FolderDataset(data, "val")
    image, mask, _ = val[0]
    bright = image.float().mean(0) > 128
    assert torch.equal(bright, mask.bool())  # evaluation sees the photo upright, aligned with its mask
    train = TrainSet(FolderDataset(data, "train"), RecipePipeline((32, 32), (64, 40), photometric=False))
    for seed in range(4):
        crop, label = train[(0, seed)]
        grey = crop.float().mean(0)
        thing, background = grey[label == 1], grey[label == 0]
        assert thing.numel() and background.numel(), seed
        # aligned: the marked third is the bright one (the edge is blurred by the bilinear resize and JPEG)
        assert thing.mean() > 180 and background.mean() < 30 and (thing > 128).float().mean() > 0.8, seed


def test_check_data_names_a_mask_drawn_on_the_stored_pixels_of_a_rotated_photo(tmp_path):
    data = _phone_dataset(tmp_path / "data", "stored")
    text = "\n".join(check_dataset(data).errors)
    assert "phone.jpg is 48x36 (hxw, upright)" in text and "phone.png is 36x48" in text
    assert "stored 36x48 with EXIF orientation 6" in text and "drawn on the unrotated photo" in text
    with pytest.raises(DatasetError, match="EXIF orientation 6"):
        FolderDataset(data, "val")[0]


# ------------------------------------------------------------------------------------- hostile files, by name

def _corpus_runs(commands, names, tmp_path, child_env) -> list:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "corpus.py"), "drive", ",".join(commands),
                           str(tmp_path), *names], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"the child ended with {proc.returncode} (a negative value is a signal):\n" \
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases = {c.name: c for c in make_corpus()}
    masks = sum(cases[n].role == "mask" for n in names) if "predict" in commands else 0  # predict reads none
    assert len(runs) == len(commands) * (1 + len(names)) - masks, proc.stdout[-2000:]
    clean_peak = {r["command"]: r["peak_rss"] for r in runs if r["case"] == "clean"}
    for run in runs:
        label = f"isa {run['command']} on {run['case']}: rc {run['rc']}\n{run['out']}"
        assert run["escaped"] is None, f"{label}\nan exception escaped:\n{run['escaped']}"
        assert "Traceback" not in run["out"], label
        case = cases.get(run["case"])
        unaffected = case is None or (
            run["command"] == "check-data" and case.name == "extreme_aspect")  # a valid file; the resize refuses it
        if unaffected:
            assert run["rc"] == 0, label
            continue
        assert run["rc"] == 1 and case.expect in run["out"], label
        if case.name != "extreme_aspect" or run["command"].startswith("train"):  # eval/predict: the inference resize
            assert f"{case.role}s/" in run["out"] and f"/bad{case.suffix}" in run["out"], label
        # the peak RSS of the run, against the same command on the clean dataset
        assert run["peak_rss"] - clean_peak[run["command"]] < 0.3 * GB, f"{label}\npeak RSS {run['peak_rss']}"
    return runs


def test_check_data_and_train_refuse_every_hostile_file_by_name(tmp_path, child_env):
    _corpus_runs(["check-data", "train"], [c.name for c in make_corpus()], tmp_path, child_env)


# the decoder that segfaulted, the allocation from a lying header, a zero-filled mask, a resize to a side of 0
SAMPLE = ["png_interlaced_bad_deflate", "jpeg_huge_sof", "mask_short_stream", "extreme_aspect"]


def test_training_eval_and_predict_end_with_a_named_error_on_hostile_files(tmp_path, child_env):
    _corpus_runs(["train-unchecked", "eval", "predict"], SAMPLE, tmp_path, child_env)


@pytest.mark.slow
def test_training_eval_and_predict_on_the_whole_corpus(tmp_path, child_env):
    _corpus_runs(["train-unchecked", "eval", "predict"], [c.name for c in make_corpus()], tmp_path, child_env)


def test_the_fuzz_script_runs_the_reader_over_a_corpus_and_reports(tmp_path, child_env):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fuzz_reader.py"), "--seconds", "3",
                           "--batch", "60", "--work", str(tmp_path)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "0 crashes" in proc.stdout and "files" in proc.stdout, proc.stdout


@pytest.mark.parametrize("mode, value", [("F", 1.7), ("CMYK", (1, 2, 3, 0)), ("YCbCr", (1, 2, 3))])
def test_a_float_cmyk_or_ycbcr_tiff_mask_is_refused_not_truncated_to_other_labels(tmp_path, mode, value):
    path = tmp_path / "m.tif"
    Image.new(mode, (3, 2), value).save(path)  # lossless, but 1.7 would become class 1 and CMYK an "RGBA" colour
    with pytest.raises(ImageError, match=rf"m.tif is a TIFF image of mode '{mode}', not class indices"):
        read_image(path, "mask")
    with pytest.raises(DatasetError, match="not class indices"):
        read_mask(path, palette=[[1, 2, 3]])
    assert read_image(path, "image").shape == (3, 2, 3)  # as a photo it is fine


def test_an_animated_lossy_webp_mask_is_refused_and_bytes_are_not_quoted_in_errors(tmp_path):
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8) * 60).convert("RGB") for _ in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=False, quality=50)
    data = buffer.getvalue()
    assert b"ANMF" in data and b"VP8 " in data  # the lossy frames sit inside the animation's ANMF chunks
    (tmp_path / "anim.webp").write_bytes(data)
    with pytest.raises(ImageError, match="anim.webp is a lossy WEBP image"):
        read_image(tmp_path / "anim.webp", "mask")
    with pytest.raises(ImageError) as err:
        read_image(data, "mask")
    assert f"({len(data)} bytes)" in str(err.value) and len(str(err.value)) < 400  # not the file's bytes


def test_orientation_comes_from_the_exif_block_only_as_opencv_reads_it(tmp_path):
    # MMSegmentation 1.2.2's LoadImageFromFile (cv2.imdecode, IMREAD_COLOR; measured in /work/mmseg_env) and
    # labelme turn a photo by its EXIF orientation, not by an XMP tiff:Orientation, which Pillow's
    # getexif / exif_transpose also obey; a TIFF Pillow turns upright itself as it loads it
    stored = np.random.default_rng(5).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(stored).save(tmp_path / "xmp.jpg", quality=95, xmp=xmp)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "exif.jpg", quality=95, exif=exif)
    Image.fromarray(stored).save(tmp_path / "exif.tif", exif=exif)
    xmp_pixels = np.asarray(Image.open(tmp_path / "xmp.jpg").convert("RGB"))  # the stored pixels, decoded
    assert probe(tmp_path / "xmp.jpg").orientation == 1
    np.testing.assert_array_equal(read_image(tmp_path / "xmp.jpg").permute(1, 2, 0).numpy(), xmp_pixels)
    fast = open_image(tmp_path / "xmp.jpg")
    np.testing.assert_array_equal(fast.permute(1, 2, 0).numpy(), xmp_pixels)
    exif_pixels = np.rot90(np.asarray(Image.open(tmp_path / "exif.jpg").convert("RGB")), k=-1)  # 6: 90° clockwise
    np.testing.assert_array_equal(read_image(tmp_path / "exif.jpg").permute(1, 2, 0).numpy(), exif_pixels)
    np.testing.assert_array_equal(open_image(tmp_path / "exif.jpg").permute(1, 2, 0).numpy(), exif_pixels)
    tif = read_image(tmp_path / "exif.tif")  # lossless: exactly the stored pixels turned 90° clockwise
    np.testing.assert_array_equal(tif.permute(1, 2, 0).numpy(), np.rot90(stored, k=-1))
    assert probe(tmp_path / "exif.tif").upright_hw == (12, 8) == tuple(tif.shape[-2:])


def test_a_16_bit_pil_image_gives_the_pixels_of_its_file(tmp_path):
    grey = np.array([[0, 256, 4096, 65535], [255, 511, 32768, 1000]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    high = np.repeat((grey >> 8).astype(np.uint8)[None], 3, axis=0)  # OpenCV's IMREAD_COLOR: the high byte
    assert torch.equal(read_image(tmp_path / "g16.png"), torch.from_numpy(high))
    with Image.open(tmp_path / "g16.png") as pil:
        assert torch.equal(to_rgb_tensor(pil), torch.from_numpy(high))  # not convert("RGB")'s clipping at 255


def test_overlapping_reads_restore_pillows_own_pixel_limit():
    from zoo import images

    before = Image.MAX_IMAGE_PIXELS
    first, second = images._pixel_limit(0), images._pixel_limit(100)  # two threads' reads, interleaved
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert Image.MAX_IMAGE_PIXELS == before  # the second restored what it saw: the first's lifted None


def test_a_jpeg_of_millions_of_empty_segments_is_refused_after_a_bounded_walk():
    from zoo.images import jpeg_header

    data = b"\xff\xd8" + b"\xff\xe0\x00\x02" * 70_000 + b"\xff\xd9"  # 280 kB that Python would walk 4 bytes a step
    with pytest.raises(ImageError, match="over 65536 marker segments before the first scan"):
        jpeg_header(data, "x.jpg")
    with pytest.raises(ImageError, match="x.jpg"):
        read_image(data, source="x.jpg")


def test_a_png_of_a_million_empty_text_chunks_is_refused_after_a_bounded_walk():
    import zlib

    from corpus import chunk

    clean = io.BytesIO()
    Image.new("L", (4, 4)).save(clean, format="PNG")
    data = clean.getvalue()
    hostile = data[:33] + chunk(b"tEXt", b"") * 5_000 + data[33:]  # 60 kB; a million: 12 MB, 10 s to read
    assert zlib.crc32(b"tEXt") == int.from_bytes(hostile[41:45], "big")  # each chunk is valid on its own
    with pytest.raises(ImageError, match="m.png: over 4096 chunks besides the pixel data"):
        read_image(hostile, "mask", source="m.png")
