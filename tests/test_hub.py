"""zoo.hub against a local HTTP server: download, hash check, cache reuse, offline and interrupted runs.

The served checkpoint is a real R-50 Cityscapes state_dict layout made of zero-stride tensors (a
~130 kB .pth); its URL carries its own sha256 prefix, as MMSeg's publish_model.py names files.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo.hub as hub
from isa.cli import main as isa_main
from zoo.hub import DownloadError, cached_weights, download, get_cache_dir, resolve_weights
from zoo.model import ISANet
from zoo.registry import get_config, list_models

NAME = "isanet_r50-d8_512x1024_40k_cityscapes"


@pytest.fixture(autouse=True)
def _free_disk(tmp_path, monkeypatch):
    """Converted R-50 files are 150 MB each; pytest keeps the last 3 runs' tmp dirs otherwise."""
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # a CI proxy must not intercept 127.0.0.1
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint_bytes():
    """A valid MMSeg-style .pth for NAME; each tensor is one stored value broadcast to its shape."""
    torch.manual_seed(0)
    state = ISANet(get_config(NAME)).state_dict()
    small = {k: torch.full((), i + 1, dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(state.items())}
    buffer = io.BytesIO()
    torch.save({"meta": {"iter": 40000}, "state_dict": small}, buffer)
    return buffer.getvalue()


class _Server:
    """Serves `routes` (path -> bytes); paths listed in `truncate` send half the body, then hang up."""

    def __init__(self):
        self.routes = {}
        self.truncate = set()
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def served(server, checkpoint_bytes):
    """The checkpoint at a URL named like a published file, with its own sha256 prefix."""
    prefix = hashlib.sha256(checkpoint_bytes).hexdigest()[:8]
    path = f"/{NAME}/{NAME}_20210901_054739-{prefix}.pth"
    server.routes[path] = checkpoint_bytes
    return server.base + path


def _closed_port_url(path="/x-12345678.pth"):
    with socket.socket() as s:  # bind then close: nothing listens on this port afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_checks_converts_and_reuses_the_cache(served, server, checkpoint_bytes, tmp_path):
    cache = tmp_path / "cache"
    path = download(NAME, cache_dir=cache, url=served, progress=False)
    assert path == cache / f"{NAME}.safetensors"
    assert _files(cache) == [f"{NAME}.safetensors"]  # .pth deleted after conversion, no temp files
    tensors = load_file(path)
    assert len(tensors) == 416
    assert tensors["backbone.stem.0.weight"].shape == (32, 3, 3, 3)
    assert torch.all(tensors["backbone.stem.0.weight"] == 1)
    assert server.requests == [served[len(server.base):]]
    # second call, cached_weights and weights="auto": no further request
    assert download(NAME, cache_dir=cache, url=served, progress=False) == path
    assert cached_weights(NAME, cache_dir=cache) == path
    assert resolve_weights(NAME, "auto", cache_dir=cache) == path
    assert len(server.requests) == 1


def test_download_with_progress_bar_and_keep_pth(served, tmp_path, capsys):
    cache = tmp_path / "cache"
    download(NAME, cache_dir=cache, url=served, keep_pth=True)
    assert _files(cache) == sorted([f"{NAME}.safetensors", served.rsplit("/", 1)[1]])
    assert "B/s" in capsys.readouterr().err  # tqdm's byte-rate bar


def test_sha_mismatch_deletes_the_download(server, checkpoint_bytes, tmp_path):
    actual = hashlib.sha256(checkpoint_bytes).hexdigest()[:8]
    wrong = "0" * 8 if actual != "0" * 8 else "1" * 8
    path = f"/{NAME}/{NAME}_20210901_054739-{wrong}.pth"
    server.routes[path] = checkpoint_bytes
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=f"sha256 {actual}.*its name says {wrong}"):
        download(NAME, cache_dir=cache, url=server.base + path, progress=False)
    assert _files(cache) == []


def test_interrupted_download_leaves_nothing_in_the_cache(served, server, tmp_path):
    server.truncate.add(served[len(server.base):])
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="interrupted"):
        download(NAME, cache_dir=cache, url=served, progress=False)
    assert _files(cache) == []
    assert cached_weights(NAME, cache_dir=cache) is None


def test_keyboard_interrupt_mid_download_leaves_nothing(served, tmp_path, monkeypatch):
    class Bar:  # tqdm stand-in whose first update is a Ctrl-C
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(hub, "tqdm", Bar)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        download(NAME, cache_dir=cache, url=served, progress=False)
    assert _files(cache) == []


def test_offline_error_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    base = _closed_port_url("/mirror")
    monkeypatch.setenv("ISA_HUB_URL", base)
    monkeypatch.setenv("ISA_HOME", str(tmp_path / "home"))
    file_name = get_config(NAME).checkpoint_url.rsplit("/", 1)[1]
    url = f"{base}/{NAME}/{file_name}"
    with pytest.raises(DownloadError) as err:
        resolve_weights(NAME, "auto", progress=False)
    message = str(err.value)
    assert url in message
    assert str(tmp_path / "home" / file_name) in message
    assert "Offline?" in message
    assert _files(tmp_path / "home") == []


def test_http_404_is_reported_with_the_same_escape_hatch(server, tmp_path):
    url = f"{server.base}/{NAME}/missing-12345678.pth"
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download(NAME, cache_dir=tmp_path, url=url, progress=False)
    assert str(tmp_path / "missing-12345678.pth") in str(err.value)


def test_pth_placed_in_cache_is_used_without_network(checkpoint_bytes, tmp_path):
    prefix = hashlib.sha256(checkpoint_bytes).hexdigest()[:8]
    file_name = f"{NAME}_20210901_054739-{prefix}.pth"
    (tmp_path / file_name).write_bytes(checkpoint_bytes)
    url = _closed_port_url(f"/{NAME}/{file_name}")  # would fail if contacted
    path = download(NAME, cache_dir=tmp_path, url=url, progress=False)
    assert path == tmp_path / f"{NAME}.safetensors" and len(load_file(path)) == 416


def test_placed_pth_with_wrong_hash_is_reported_and_kept(checkpoint_bytes, tmp_path):
    placed = tmp_path / f"{NAME}_20210901_054739-{'0' * 8}.pth"
    placed.write_bytes(checkpoint_bytes[:-1] + b"!")
    with pytest.raises(DownloadError, match=f"{placed}: file has sha256 .*its name says 00000000: delete or replace it"):
        download(NAME, cache_dir=tmp_path, url=_closed_port_url(f"/{NAME}/{placed.name}"), progress=False)
    assert _files(tmp_path) == [placed.name]


def test_default_urls_are_mmsegs_and_env_overrides_the_base(monkeypatch):
    monkeypatch.delenv("ISA_HUB_URL", raising=False)
    for name in list_models():
        config = get_config(name)
        assert hub.checkpoint_url(name) == config.checkpoint_url
        assert config.checkpoint_url.startswith(f"https://download.openmmlab.com/mmsegmentation/v0.5/isanet/{name}/")
        assert config.checkpoint_url.endswith(f"-{config.checkpoint_sha256_prefix}.pth")
    monkeypatch.setenv("ISA_HUB_URL", "http://mirror.local/isanet/")
    assert hub.checkpoint_url(NAME) == ("http://mirror.local/isanet/" + NAME + "/" + NAME
                                        + "_20210901_054739-981bd763.pth")


def test_cache_dir_defaults_and_isa_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ISA_HOME", raising=False)
    assert get_cache_dir() == Path.home() / ".cache" / "isa-triton"
    monkeypatch.setenv("ISA_HOME", str(tmp_path))
    assert get_cache_dir() == tmp_path
    assert get_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert cached_weights(NAME) is None


def test_resolve_weights_explicit_file_and_errors(tmp_path):
    assert resolve_weights(NAME, None) is None
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert resolve_weights(NAME, str(weights)) == weights
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        resolve_weights(NAME, tmp_path / "nope.pth")
    with pytest.raises(KeyError, match="Did you mean"):
        cached_weights("isanet_r50-d8_512x1024_40k_cityscape", cache_dir=tmp_path)


def test_cli_download(served, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert isa_main(["download", NAME, "--cache-dir", str(cache), "--url", served, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / f"{NAME}.safetensors")
    assert isa_main(["download", "isanet_r50*", "--url", served, "--cache-dir", str(cache)]) == 2
    assert "--url needs exactly one variant" in capsys.readouterr().err
    assert isa_main(["download", "isanet_r5O*", "--cache-dir", str(cache)]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def backbone_bytes():
    """mmcv-style ImageNet ResNet-50 V1c weights: the backbone's keys without prefix, plus `fc.*`."""
    state = ISANet(get_config(NAME)).backbone.state_dict()
    small = {k: torch.full((), i + 1, dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(state.items())}
    small.update({"fc.weight": torch.zeros(()).expand(1000, 2048), "fc.bias": torch.zeros(1000)})
    buffer = io.BytesIO()
    torch.save({"state_dict": small}, buffer)
    return buffer.getvalue()


@pytest.fixture
def served_backbone(server, backbone_bytes, monkeypatch):
    """NAME's `pretrained_url` pointed at the local server, named with the served file's sha256 prefix."""
    import dataclasses

    file_name = f"resnet50_v1c-{hashlib.sha256(backbone_bytes).hexdigest()[:8]}.pth"
    server.routes[f"/pretrain/{file_name}"] = backbone_bytes
    config = dataclasses.replace(get_config(NAME), pretrained_url=f"{server.base}/pretrain/{file_name}")
    monkeypatch.setattr(hub, "get_config", lambda name: config if name == NAME else get_config(name))
    return file_name


def test_backbone_weights_are_fetched_once_checked_and_load_into_the_model(served_backbone, server, tmp_path):
    from train.builders import load_backbone_weights

    cache = tmp_path / "cache"
    path = hub.backbone_weights(NAME, cache_dir=cache, progress=False)
    assert path == cache / served_backbone and _files(cache) == [served_backbone]
    assert hub.backbone_weights(NAME, cache_dir=cache, progress=False) == path
    assert len(server.requests) == 1  # the second call used the cache
    model = ISANet(get_config(NAME))
    assert load_backbone_weights(model, str(path)) == ["fc.bias", "fc.weight"]
    assert torch.all(model.backbone.stem[0].weight == 1)
    path.write_bytes(path.read_bytes()[:-1] + b"!")  # a corrupted cache file is refused, not used
    with pytest.raises(DownloadError, match="delete or replace it"):
        hub.backbone_weights(NAME, cache_dir=cache, progress=False)


def test_backbone_download_errors_name_the_escape_hatch(server, tmp_path):
    published = get_config(NAME).pretrained_url  # resnet50_v1c-2cccc1ad.pth: the served bytes do not match
    server.routes["/resnet50_v1c-2cccc1ad.pth"] = b"not the published file"
    with pytest.raises(DownloadError, match="its name says 2cccc1ad"):
        hub.backbone_weights(NAME, cache_dir=tmp_path, url=server.base + "/resnet50_v1c-2cccc1ad.pth", progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(DownloadError) as err:
        hub.backbone_weights(NAME, cache_dir=tmp_path, url=_closed_port_url(), progress=False)
    message = str(err.value)
    assert "Offline?" in message and str(tmp_path / published.rsplit("/", 1)[1]) in message
    assert "--backbone-weights /path/to/resnet50_v1c-2cccc1ad.pth" in message


def test_cli_download_with_backbone(served, served_backbone, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert isa_main(["download", NAME, "--cache-dir", str(cache), "--url", served, "--backbone", "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(cache / f"{NAME}.safetensors"), str(cache / served_backbone)]


def test_training_build_fetches_the_backbone_once_and_resumed_runs_read_nothing(served_backbone, server, tmp_path,
                                                                                monkeypatch):
    from train import TrainConfig
    from train.builders import build_model

    monkeypatch.setenv("ISA_HOME", str(tmp_path / "home"))
    cfg = TrainConfig(model=NAME, data_root="unused", backbone_weights="auto", progress=False)
    model = build_model(cfg, num_classes=19)
    assert torch.all(model.backbone.stem[0].weight == 1) and len(server.requests) == 1
    build_model(cfg, num_classes=19)
    assert len(server.requests) == 1  # cached
    resumed = build_model(cfg, num_classes=19, pretrained=False)
    assert not torch.all(resumed.backbone.stem[0].weight == 1) and len(server.requests) == 1
