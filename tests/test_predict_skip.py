"""`isa predict` over a folder finishes the batch: unreadable files are skipped with one line each and named
in a summary, exit code 1; --strict stops at the first."""
from __future__ import annotations

import shutil

from isa.cli import main
from train.synthetic import make_synthetic_dataset

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"


def _predict(folder, out, *extra):
    return main(["predict", "--model", MODEL, "--weights", "none", str(folder), "--out-dir", str(out), "--device",
                 "cpu", "--no-progress", "--test-scale", "48", "40", "--workers", "0", *extra])


def test_predict_skips_two_corrupt_files_writes_every_other_mask_names_them_and_exits_1(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=1, size_hw=(40, 48))
    photos = tmp_path / "photos"
    shutil.copytree(data / "images/train", photos)
    (photos / "sub").mkdir()
    (photos / "img_001b.png").write_bytes((photos / "img_001.png").read_bytes()[:60])  # truncated
    (photos / "sub" / "notes.jpg").write_bytes(b"this is not a JPEG")
    good = ["img_000", "img_001", "img_002", "img_003"]

    assert _predict(photos, tmp_path / "out") == 1
    captured = capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "out").rglob("*_mask.png"))
    assert written == [f"{name}_mask.png" for name in good]
    assert len(list((tmp_path / "out").rglob("*_overlay.png"))) == 4
    lines = captured.err.strip().splitlines()
    skip_lines = [line for line in lines if line.startswith("isa predict: skipped ") and ": " in line[21:]]
    assert len(skip_lines) == 3, captured.err  # one per file, then the summary
    summary = skip_lines[-1]
    assert "skipped 2 unreadable files of 6" in summary
    assert str(photos / "img_001b.png") in summary and str(photos / "sub" / "notes.jpg") in summary
    assert "Traceback" not in captured.err and "wrote 8 files" in captured.out

    assert _predict(photos, tmp_path / "strict", "--strict") == 1
    err = capsys.readouterr().err
    assert "img_001b.png" in err and "notes.jpg" not in err and "Traceback" not in err
    assert not (tmp_path / "strict" / "img_002_mask.png").exists()  # stopped at the first
