"""The README's Python snippets run as written, in order, in a fresh folder: cached checkpoints (random
weights) stand in for the downloads, a generated photo and folder dataset for the user's, and the
fine-tuning sizes are shrunk to a CPU test's (the numbers are the only edit)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import zoo
from train.synthetic import make_synthetic_dataset
from zoo.weights import convert_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = [(r"iters=\d+", "iters=2"), (r"crop_size=\(\d+, \d+\)", "crop_size=(32, 32)"),
          (r"batch_size=\d+", "batch_size=2")]


def test_readme_python_snippets_run(tmp_path, monkeypatch, free_disk):
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(snippets) >= 2  # segment a photo; fine-tune and use the result
    names = set(re.findall(r'"(isanet_[^"]+)"', "\n".join(snippets)))
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in names:
        src = tmp_path / f"{name}.pth"
        torch.save({"state_dict": zoo.ISANet(zoo.get_config(name)).state_dict()}, src)
        convert_checkpoint(src, cache / f"{name}.safetensors", name)
    monkeypatch.setenv("ISA_HOME", str(cache))
    monkeypatch.setenv("ISA_HUB_URL", "http://127.0.0.1:9/unreachable")  # must not be needed
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save("street.jpg")
    data = make_synthetic_dataset(tmp_path / "my_data", num_train=2, num_val=1, size_hw=(40, 48))
    (data / "dataset.json").write_text(json.dumps({"classes": ["background", "square", "disc"]}))

    scope: dict = {}
    for snippet in snippets:
        for pattern, small in SHRINK:
            snippet = re.sub(pattern, small, snippet)
        exec(compile(snippet, str(README), "exec"), scope)
    photo_labels = scope["labels"]
    assert photo_labels.shape == (120, 160) and int(photo_labels.max()) < 3  # the fine-tuned model's classes
    assert list(scope["tuned"].classes) == ["background", "square", "disc"]
    assert Path("street_overlay.png").is_file() and Path("runs/mine/best.safetensors").is_file()
