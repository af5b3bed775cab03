"""The README's Python snippet runs as written (with a cached checkpoint standing in for the download)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import zoo
from zoo.weights import convert_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    name = re.search(r'create_model\("([^"]+)"', snippet).group(1)
    cache = tmp_path / "cache"
    cache.mkdir()
    src = tmp_path / "mmseg.pth"
    torch.save({"meta": {"CLASSES": ("a",)}, "state_dict": zoo.ISANet(zoo.get_config(name)).state_dict()}, src)
    convert_checkpoint(src, cache / f"{name}.safetensors", name)
    monkeypatch.setenv("ISA_HOME", str(cache))
    monkeypatch.setenv("ISA_HUB_URL", "http://127.0.0.1:9/unreachable")  # must not be needed
    scope: dict = {}
    exec(compile(snippet, str(README), "exec"), scope)
    labels = scope["labels"]
    assert labels.shape == (1, 256, 512) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < 19
