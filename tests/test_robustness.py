"""Nothing lost, nothing silent: the work-dir lock, non-finite weights, full disks, bounded prediction memory,
listing files as MMSegmentation does, and the messages that name the fix."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from isa.cli import main
from train.lock import WorkDirBusy, WorkDirLock
from train.synthetic import make_synthetic_dataset
from zoo.reader import read_metadata
from zoo.utils import WriteError, atomic_write

REPO = Path(__file__).resolve().parents[1]
MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


def _train(data: Path, work: Path, iters: int = 2, *extra: str) -> list:
    return [sys.executable, "-m", "isa", "train", "--model", MODEL, "--data", str(data), "--weights", "none",
            "--iters", str(iters), "--crop-size", "32", "32", "--batch-size", "2", "--device", "cpu",
            "--threads", "1", "--no-progress", "--work-dir", str(work), *extra]


# ------------------------------------------------------------------------------------------------ the lock

def test_a_second_run_into_a_live_work_dir_fails_at_once_naming_the_lock(tmp_path, child_env, free_disk):
    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, size_hw=(40, 48))
    work = tmp_path / "run"
    first = subprocess.Popen(_train(data, work, 6), env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (work / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (work / ".lock").exists(), first.communicate()[0]
    started = time.monotonic()
    second = subprocess.run(_train(data, work), env=child_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in second.stderr and str(work / ".lock") in second.stderr
    assert time.monotonic() - started < 30  # at once: before datasets or the model are built
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert not (work / ".lock").exists()
    assert json.loads((work / "config.json").read_text())["iters"] == 6 and (work / "model.safetensors").is_file()


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                "started": "earlier"}))
    with caplog.at_level("WARNING"), WorkDirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(WorkDirBusy, match=f"pid {os.getpid()}"):
            WorkDirLock(tmp_path).acquire()
    assert "taking over" in caplog.text and not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------------ finite weights

def test_weights_with_a_nan_are_refused_by_every_command_naming_the_tensor(tmp_path, capsys):
    import zoo
    from zoo.weights import save_weights

    torch.manual_seed(0)
    model = zoo.create_model(MODEL, num_classes=3)
    state = model.state_dict()
    state["decode_head.in_conv.conv.weight"][0, 0, 0, 0] = float("nan")
    good = save_weights(model.state_dict(), tmp_path / "ok.safetensors", model.meta)
    bad = tmp_path / "nan.safetensors"
    save_file(load_file(str(good)), str(bad), metadata=read_metadata(good))
    tensors = load_file(str(bad))
    tensors["decode_head.in_conv.conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(bad), metadata=read_metadata(good))
    pth = tmp_path / "nan.pth"
    torch.save({"state_dict": zoo.ISANet(zoo.get_config(MODEL)).state_dict() | {
        "backbone.stem.0.weight": torch.full((32, 3, 3, 3), float("inf"))}}, pth)
    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, size_hw=(40, 48))
    image = str(data / "images/val/img_000.png")
    commands = [["predict", "--weights", str(bad), image, "--out-dir", str(tmp_path / "p")],
                ["eval", "--weights", str(bad), "--data", str(data), "--workers", "0"],
                ["train", "--model", MODEL, "--data", str(data), "--weights", str(bad), "--iters", "1",
                 "--work-dir", str(tmp_path / "t"), "--no-progress"],
                ["convert", str(pth), str(tmp_path / "c.safetensors"), "--model", MODEL]]
    for argv in commands:
        assert main(argv + ["--device", "cpu"] if argv[0] != "convert" else argv) == 1, argv
        err = capsys.readouterr().err
        name = "backbone.stem.0.weight" if argv[0] == "convert" else "decode_head.in_conv.conv.weight"
        assert name in err and ("NaN" in err or "infinite" in err), (argv[0], err)
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------- full disks

def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_file_is_kept(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write(target, lambda f: torch.save({"iteration": 1}, f))

    def fill_the_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as err:
        atomic_write(target, fill_the_disk)
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "no space left" in message and "free in" in message
    assert "previous version was kept" in message
    assert torch.load(target, weights_only=True) == {"iteration": 1}  # still loadable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file

    def torch_zip_writer_fails(f):  # what torch.save raises when the disk fills under its zip writer
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(WriteError, match=str(target)):
        atomic_write(target, torch_zip_writer_fails)


def test_isa_predict_onto_a_full_disk_prints_one_line_and_exits_1(tmp_path, capsys, monkeypatch):
    import zoo.visualize

    data = make_synthetic_dataset(tmp_path / "data", num_train=1, num_val=1, size_hw=(40, 48))

    def full(image, path):
        raise WriteError(errno.ENOSPC, f"cannot write {path}: no space left on the device (0 B free in "
                                       f"{Path(path).parent}); nothing was written")

    monkeypatch.setattr(zoo.visualize, "save_png", full)
    import eval.predict
    monkeypatch.setattr(eval.predict, "save_png", full)
    code = main(["predict", "--model", MODEL, "--weights", "none", str(data / "images/val"), "--out-dir",
                 str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--test-scale", "64", "48"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "no space left" in err and "img_000_mask.png" in err


# ------------------------------------------------------------------------------------------------ messages

def test_a_missing_data_folder_says_so(tmp_path, capsys):
    assert main(["train", "--model", MODEL, "--data", str(tmp_path / "nope"), "--weights", "none",
                 "--device", "cpu", "--work-dir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} does not exist or is not a folder" in err


def test_offline_hints_name_cli_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ISA_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ISA_HUB_URL", "http://127.0.0.1:9/nowhere")  # a closed port: refused at once
    assert main(["predict", "--model", MODEL, str(tmp_path), "--out-dir", str(tmp_path / "o"), "--device",
                 "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--weights /path/to/the.pth" in err and "weights='" not in err.split("(")[0]


# --------------------------------------------------------------------------------- listing as MMSeg does

def test_dataset_listing_follows_mmengine(tmp_path):
    """Hidden files skipped, directory links followed once (a loop ends), suffixes matched case-sensitively."""
    from eval.datasets import CityscapesDataset

    root = tmp_path / "cityscapes"
    elsewhere = tmp_path / "elsewhere" / "bonn"
    for folder in (root / "leftImg8bit/val/aachen", elsewhere, root / "gtFine/val/aachen", root / "gtFine/val/bonn"):
        folder.mkdir(parents=True)
    (root / "leftImg8bit/val/bonn").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(elsewhere, target_is_directory=True)
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    mask = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    for city, folder in (("aachen", root / "leftImg8bit/val/aachen"), ("bonn", elsewhere)):
        image.save(folder / f"{city}_0_leftImg8bit.png")
        mask.save(root / f"gtFine/val/{city}/{city}_0_gtFine_labelTrainIds.png")
    (root / "leftImg8bit/val/aachen/._aachen_0_leftImg8bit.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    image.save(root / "leftImg8bit/val/aachen/aachen_1_leftImg8bit.PNG")  # not the configured suffix
    names = [s.name for s in CityscapesDataset(root, "val").samples]
    assert names == ["aachen/aachen_0", "bonn/bonn_0"]


# ------------------------------------------------------------------------------------ bounded memory

def _peak_rss_mb(argv: list, env: dict) -> float:
    script = ("import resource, sys; from isa.cli import main; code = main(sys.argv[1:]); "
              "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("RSS")[-1])


def _big_jpeg(path: Path, w: int, h: int) -> Path:
    yy, xx = np.mgrid[0:h:40, 0:w:40]
    small = np.stack([(xx * 0.05) % 255, (yy * 0.07) % 255, ((xx + yy) * 0.03) % 255], -1).astype(np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)
    return path


@pytest.mark.parametrize("w, h", [pytest.param(4000, 3000, id="12MP"),
                                  pytest.param(8000, 6000, id="48MP", marks=pytest.mark.slow)])
def test_predicting_a_large_photo_with_150_classes_stays_within_a_bounded_memory(tmp_path, child_env, w, h):
    """Full-size per-class maps would need w*h*150*4 bytes (7.2 GB at 12 MP, 28.8 GB at 48 MP)."""
    photo = _big_jpeg(tmp_path / "photo.jpg", w, h)
    rss = _peak_rss_mb(["predict", "--model", "isanet_r50-d8_512x512_80k_ade20k", "--weights", "none", str(photo),
                        "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--no-progress"], child_env())
    assert rss < 3000, f"peak RSS {rss:.0f} MB"
    assert Image.open(tmp_path / "out/photo_mask.png").size == (w, h)


def test_banded_labels_equal_the_full_size_path():
    """The argmax of F.interpolate's full-size logits (what 0.x computes), on logits with structure and noise."""
    import torch.nn.functional as F
    from zoo.inference import class_maps

    g = torch.Generator().manual_seed(0)
    regions = F.interpolate(torch.rand(2, 150, 5, 6, generator=g), size=(24, 33), mode="bilinear")
    logits = (regions == regions.amax(1, keepdim=True)).float() * 4 + torch.randn(2, 150, 24, 33, generator=g)
    for align in (False, True):
        full = F.interpolate(logits, size=(190, 251), mode="bilinear", align_corners=align)
        got = class_maps([(logits, False)], (190, 251), align, band_elements=1 << 20)
        assert torch.equal(got.long(), full.argmax(1))
        probs = class_maps([(logits, False), (logits.flip(-1), True)], (190, 251), align, probs=True,
                           band_elements=1 << 20)
        want = (full.softmax(1) + F.interpolate(logits.flip(-1), size=(190, 251), mode="bilinear",
                                                align_corners=align).softmax(1).flip(-1)) / 2
        torch.testing.assert_close(probs, want, atol=2e-6, rtol=0)
