"""`hf-hub:` weights and `isa push` against a Hub the test starts on 127.0.0.1.

The server answers the two requests huggingface_hub's `hf_hub_download` makes (HEAD, then GET of
`/{repo}/resolve/{revision}/{file}` with the X-Repo-Commit and ETag headers, errors by X-Error-Code), so
the cache is filled by the library itself; offline runs then read that cache with the server stopped.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from isa.cli import main
from zoo.hub import DownloadError, hf_hub_weights, mirror_weights, resolve_weights
from zoo.metadata import ModelMeta
from zoo.weights import save_weights

huggingface_hub = pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.usefixtures("free_disk")  # R-50 weights are 150 MB, in the cache and the upload folder

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"
REPO = "me/isanet-shapes"
CLASSES = ["background", "square", "disc"]


class Hub:
    """repo -> {revision name or commit: (commit, {file: bytes})}; HEAD and GET of /{repo}/resolve/{rev}/{file}."""

    def __init__(self):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
                repo = hub.repos.get(match.group(1)) if match else None
                if repo is None:
                    return self._error(404, "RepoNotFound")
                if match.group(2) not in repo:
                    return self._error(404, "RevisionNotFound")
                commit, files = repo[match.group(2)]
                if match.group(3) not in files:
                    return self._error(404, "EntryNotFound", commit)
                data = files[match.group(3)]
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code, error, commit=None):
                self.send_response(code)
                self.send_header("X-Error-Code", error)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def publish(self, repo: str, files: dict[str, bytes], revisions=("main",)) -> str:
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                              ).hexdigest()
        for name in (*revisions, commit):
            self.repos.setdefault(repo, {})[name] = (commit, files)
        return commit

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    server = Hub()
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A fine-tuned-looking weights file (3 classes, training metadata) and its run's config.json."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = zoo.ISANet(zoo.get_config(MODEL), num_classes=3)
    meta = ModelMeta.for_variant(model.config, 3, CLASSES, extra={"source_file": "isa train", "train_iters": 40,
                                                                 "dataset": "folder", "data": "/home/me/shapes",
                                                                 "best_iter": 30, "best_mIoU": 61.25})
    save_weights(model.state_dict(), run / "best.safetensors", meta)
    (run / "config.json").write_text(json.dumps({"model": MODEL, "train_images": 12, "crop_size": [32, 32]}))
    yield run / "best.safetensors"
    shutil.rmtree(run, ignore_errors=True)


def test_push_dry_run_card_parses_its_snippet_loads_from_the_hub_then_offline_from_the_cache(
        hub, tuned, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "upload"
    assert main(["push", str(tuned), REPO, "--dry-run", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == tuned.read_bytes()
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "isa-triton"
    assert "image-segmentation" in data["tags"]
    text = card.text
    assert MODEL in text and "61.25" in text and "| 2 | disc |" in text and "12 training images" in text
    assert "/home/me" not in card.content  # the folder's name only, not the machine's path
    # the card's snippet, run as written against the served upload folder: the library fills its cache
    commit = hub.publish(REPO, {p.name: p.read_bytes() for p in folder.iterdir()})
    snippet = re.search(r"```python\n(.*?)```", card.content, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)
    seg = scope["seg"]
    assert list(seg.classes) == CLASSES
    assert any(r.startswith(f"GET /{REPO}/resolve/main/model.safetensors") for r in hub.requests)
    cached = list((tmp_path / "hf-cache").rglob("model.safetensors"))
    assert len(cached) == 1 and commit in str(cached[0])
    # offline: the server is gone, HF_HUB_OFFLINE is set; the cache alone gives the same weights
    hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = zoo.create_model(weights=f"hf-hub:{REPO}")
    state, local = from_hub.state_dict(), load_file(tuned)
    assert set(local) <= set(state) and len(local) > 300
    for k, v in local.items():
        assert torch.equal(state[k], v), k
    assert list(from_hub.meta.classes) == CLASSES
    assert resolve_weights(None, f"hf-hub:{REPO}@{commit}").read_bytes() == tuned.read_bytes()  # pinned commit


def test_offline_with_an_empty_cache_names_the_repo_and_offline_mode(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"hf-hub:{REPO}: model.safetensors is not in the Hugging Face cache .* "
                                            r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        zoo.create_model(weights=f"hf-hub:{REPO}")
    assert hub.requests == []  # offline means no request at all
    assert main(["predict", "--weights", f"hf-hub:{REPO}", "x.png", "--out-dir", "o", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert REPO in err and "HF_HUB_OFFLINE" in err


def test_revisions_are_pinned_and_missing_things_are_named(hub):
    v1 = hub.publish(REPO, {"model.safetensors": b"first"}, revisions=("v1",))
    v2 = hub.publish(REPO, {"model.safetensors": b"second"}, revisions=("main",))
    assert hf_hub_weights(f"hf-hub:{REPO}@v1").read_bytes() == b"first"
    assert hf_hub_weights(f"hf-hub:{REPO}").read_bytes() == b"second"
    assert v1 in str(hf_hub_weights(f"hf-hub:{REPO}@{v1}")) and v1 != v2
    with pytest.raises(DownloadError, match=r"no model repo 'me/other'"):
        hf_hub_weights("hf-hub:me/other")
    with pytest.raises(DownloadError, match=r"has no revision 'v9'"):
        hf_hub_weights(f"hf-hub:{REPO}@v9")
    hub.publish("me/empty", {"README.md": b"#"})
    with pytest.raises(DownloadError, match=r"hf-hub:me/empty: the repo has no model.safetensors"):
        hf_hub_weights("hf-hub:me/empty")
    with pytest.raises(ValueError, match="hf-hub:OWNER/REPO"):
        hf_hub_weights("hf-hub:not-a-repo")


def test_a_mirror_serves_the_variants_checked_against_the_published_hash(hub, tmp_path, monkeypatch):
    prefix = zoo.get_config(MODEL).checkpoint_sha256_prefix
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, good, metadata={"variant": MODEL, "source_sha256": prefix + "0" * 56})
    save_file({"x": torch.zeros(1)}, bad, metadata={"variant": MODEL, "source_sha256": "f" * 64})
    hub.publish("mirror/isanet", {f"{MODEL}.safetensors": good.read_bytes()})
    hub.publish("mirror/wrong", {f"{MODEL}.safetensors": bad.read_bytes()})
    assert mirror_weights(MODEL, "mirror/isanet").read_bytes() == good.read_bytes()
    with pytest.raises(DownloadError, match=rf"records source sha256 ffffffff.*has {prefix}"):
        mirror_weights(MODEL, "mirror/wrong")
    monkeypatch.setenv("ISA_HOME", str(tmp_path / "empty-isa-cache"))
    monkeypatch.setenv("ISA_HF_MIRROR", "mirror/isanet")
    assert resolve_weights(MODEL, "auto").read_bytes() == good.read_bytes()  # not download.openmmlab.com


def test_push_uploads_exactly_the_dry_run_folder(tuned, tmp_path, monkeypatch, capsys):
    """The upload itself needs the real Hub; what it is given is checked here: the dry-run folder's files."""
    sent = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            sent["repo"] = (repo_id, kwargs)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            sent["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(tuned), REPO, "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"https://hub/{REPO}/commit/abc"
    assert sent["repo"] == (REPO, {"repo_type": "model", "private": True, "exist_ok": True})
    assert main(["push", str(tuned), REPO, "--dry-run", str(tmp_path / "dry")]) == 0
    assert sent["files"] == {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir()}
    with pytest.raises(SystemExit):
        main(["push", str(tuned)])  # the repo is required
    assert main(["push", str(tuned), "not-a-repo", "--dry-run", str(tmp_path / "x")]) == 1
    assert "hf-hub:OWNER/REPO" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["hf-hub:me/repo\n", "hf-hub:me/..", "hf-hub:me/a--b", "hf-hub:me/répo",
                                  "hf-hub:me/repo.", "hf-hub:me/" + "x" * 97, "hf-hub:me/repo@",
                                  "hf-hub:me/repo@../../../tmp/x", "hf-hub:me/repo@v1@v2"])
def test_hf_hub_specs_huggingface_hub_would_refuse_or_that_climb_out_of_the_cache_are_named(spec, tmp_path):
    from isa.importing import stage_push
    from zoo.hub import parse_hf_hub

    with pytest.raises(ValueError, match="hf-hub:OWNER/REPO"):  # before huggingface_hub sees it
        parse_hf_hub(spec)
    with pytest.raises(ValueError, match="OWNER/REPO"):
        stage_push(tmp_path / "w.safetensors", spec[len("hf-hub:"):], tmp_path / "up")
    assert parse_hf_hub("hf-hub:me/isanet_cats.v2@refs/pr/1") == ("me/isanet_cats.v2", "refs/pr/1")
    with pytest.raises(ValueError, match="give a branch with --revision"):
        stage_push(tmp_path / "w.safetensors", "me/repo@v1", tmp_path / "up")
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("config", ["{not json", "[1, 2]"])
def test_push_names_a_bad_config_json_beside_the_weights_and_writes_nothing(tuned, tmp_path, config, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(tuned, run / "best.safetensors")
    (run / "config.json").write_text(config)
    assert main(["push", str(run / "best.safetensors"), REPO, "--dry-run", str(tmp_path / "up")]) == 1
    assert str(run / "config.json") in capsys.readouterr().err
    assert not (tmp_path / "up").exists()
