"""Published weights: a cache folder, a hash-checked download, and `weights="auto"` resolution.

Cache: `$ISA_HOME` (default `~/.cache/isa-triton`) holds `<variant>.safetensors`, one per variant.
`download` streams MMSeg's `.pth` to a temp file in the cache, checks the sha256 prefix in its file
name (`...-981bd763.pth`), converts it to `<variant>.safetensors` (atomic) and deletes the `.pth`:
the .safetensors records the source's full sha256, and keeping both would double the cache
(150-230 MB a variant). `keep_pth=True` keeps it as `<cache>/<original file name>`.

Offline: copy the original `.pth` to `<cache>/<original file name>`; it is hash-checked and
converted on first use without any network access. `$ISA_HUB_URL` replaces the URL base
`https://download.openmmlab.com/mmsegmentation/v0.5/isanet` (a mirror with the same
`<variant>/<file>` layout).

Hugging Face: `hf-hub:OWNER/REPO[@REV]` (`hf_hub_weights`) loads the `model.safetensors` that `isa push`
uploads, through huggingface_hub's own cache, offline mode and token; `$ISA_HF_MIRROR=OWNER/REPO[@REV]`
makes `weights="auto"` take `<variant>.safetensors` from such a repo (`mirror_weights`, checked against
the published sha256 the file records) instead of the URL. Both need the optional extra `hub`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

from tqdm import tqdm

from .registry import get_config
from .reader import PUBLISH_HASH, sha256_file
from .weights import convert_checkpoint

log = logging.getLogger(__name__)

ENV_HOME = "ISA_HOME"
ENV_HUB_URL = "ISA_HUB_URL"
DEFAULT_CACHE_DIR = "~/.cache/isa-triton"
DEFAULT_HUB_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/isanet"
_CHUNK = 1 << 20
_TIMEOUT_S = 60

PathLike = Union[str, "os.PathLike[str]"]
_INSTEAD = ("--weights /path/to/the.pth (weights='/path/to/the.pth' in Python), or --weights none for random "
            "weights (weights='none'; a smoke test, not a trained model)")


class DownloadError(RuntimeError):
    """A download that failed (offline, HTTP error, interrupted, wrong hash); says what to do instead."""


def get_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The weights cache: `cache_dir`, else `$ISA_HOME`, else `~/.cache/isa-triton` (not created).

    Example:
        >>> get_cache_dir()
        PosixPath('/home/me/.cache/isa-triton')
    """
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_HOME) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def checkpoint_url(name: str) -> str:
    """The variant's `.pth` URL: MMSeg's, or under `$ISA_HUB_URL` when set.

    Example:
        >>> checkpoint_url("isanet_r50-d8_512x1024_40k_cityscapes").rsplit("-", 1)[-1]
        '981bd763.pth'
    """
    url = get_config(name).checkpoint_url
    base = os.environ.get(ENV_HUB_URL)
    if not base:
        return url
    file_name = url.rsplit("/", 1)[-1]
    return f"{base.rstrip('/')}/{name}/{file_name}"


def _file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise ValueError(f"URL {url} does not end in a file name")
    return name


def cached_weights(name: str, *, cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """`<cache>/<name>.safetensors` if it is there (files are written atomically), else None.

    Example:
        >>> cached_weights("isanet_r50-d8_512x1024_40k_cityscapes") is None  # before `isa download`
        True
    """
    get_config(name)  # a typo raises KeyError with close matches instead of "not cached"
    path = get_cache_dir(cache_dir) / f"{name}.safetensors"
    return path if path.is_file() else None


def _check_hash(sha256: str, expected_prefix: Optional[str], source: str, placed: bool = False) -> None:
    if expected_prefix and not sha256.startswith(expected_prefix):
        fix = ("delete or replace it" if placed
               else "the download is corrupt or the server sent another file; it was deleted, nothing "
                    "was cached; try again")
        raise DownloadError(f"{source}: {'file' if placed else 'downloaded file'} has sha256 "
                            f"{sha256[:8]}..., its name says {expected_prefix}: {fix}")


def _offline_message(what: str, url: str, reason: str, cache: Path, offline: bool = True,
                     instead: str = _INSTEAD, place_as: Optional[str] = None) -> str:
    where = "Offline? Download that URL elsewhere" if offline else "Download it elsewhere"
    return (f"cannot download the weights of {what} from {url} ({reason}). {where} and copy the file "
            f"to {cache / (place_as or _file_name(url))} (it is hash-checked on first use), or pass {instead}")


def _stream(url: str, out, progress: bool, label: str) -> str:
    """Copy `url` into the open file `out`, returning the sha256; short reads raise DownloadError."""
    request = urllib.request.Request(url, headers={"User-Agent": "isa-triton"})
    digest = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not progress, file=sys.stderr) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns EOF, not an error, when the server closes early: compare with the header
    if total is not None and received != total:
        raise DownloadError(f"{url}: download interrupted after {received} of {total} bytes; "
                            "nothing was cached; try again")
    return digest.hexdigest()


def download(name: str, *, cache_dir: Optional[PathLike] = None, progress: bool = True,
             url: Optional[str] = None, force: bool = False, keep_pth: bool = False,
             instead: str = _INSTEAD) -> Path:
    """Fetch variant `name`'s published checkpoint into the cache as `<name>.safetensors`.

    Reuses the cached file (no request) unless `force`. A `.pth` already placed at
    `<cache>/<original file name>` is used without network. The sha256 prefix in the file name is
    checked; nothing partial is ever left in the cache. `url` overrides the variant's URL. `instead`:
    the alternative an offline error suggests (the caller's own flag).

    Example:
        >>> download("isanet_r50-d8_512x1024_40k_cityscapes")
        PosixPath('/home/me/.cache/isa-triton/isanet_r50-d8_512x1024_40k_cityscapes.safetensors')
    """
    config = get_config(name)
    cache = get_cache_dir(cache_dir)
    dst = cache / f"{name}.safetensors"
    if dst.is_file() and not force:
        return dst
    url = url or checkpoint_url(name)
    file_name = _file_name(url)
    match = PUBLISH_HASH.search(file_name)
    expected_prefix = match.group(1) if match else None
    if expected_prefix is None:
        if file_name == _file_name(config.checkpoint_url):
            expected_prefix = config.checkpoint_sha256_prefix
        else:
            log.warning("%s: no sha256 prefix in the file name; the download cannot be checked", url)
    cache.mkdir(parents=True, exist_ok=True)

    placed = cache / file_name
    if placed.is_file():  # the offline escape hatch: a user copied the .pth here
        _check_hash(sha256_file(placed), expected_prefix, str(placed), placed=True)
        log.info("using %s placed in the cache", placed)
        return convert_checkpoint(placed, dst, name)
    with _fetch(url, cache, expected_prefix, name, progress, instead=instead) as tmp:
        if keep_pth:
            os.replace(tmp, placed)
            return convert_checkpoint(placed, dst, name)
        return convert_checkpoint(tmp, dst, name)


@contextlib.contextmanager
def _fetch(url: str, cache: Path, expected_prefix: Optional[str], what: str, progress: bool,
           instead: str = _INSTEAD, place_as: Optional[str] = None) -> Iterator[Path]:
    """Download `url` to a temp file in `cache`, check its sha256 prefix, yield it; always removed after
    (move it away inside the block to keep it): nothing partial or unchecked stays in the cache."""
    file_name = _file_name(url)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=cache)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                sha256 = _stream(url, out, progress, file_name)
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as exc:
            raise DownloadError(_offline_message(what, url, f"HTTP {exc.code} {exc.reason}", cache,
                                                offline=False, instead=instead, place_as=place_as)) from exc
        except urllib.error.URLError as exc:
            raise DownloadError(_offline_message(what, url, str(exc.reason), cache, instead=instead,
                                                place_as=place_as)) from exc
        except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            raise DownloadError(f"{url}: download interrupted ({type(exc).__name__}: {exc}); nothing "
                                "was cached; try again") from exc
        _check_hash(sha256, expected_prefix, url)
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def backbone_weights(name: str, *, cache_dir: Optional[PathLike] = None, progress: bool = True,
                     force: bool = False, url: Optional[str] = None) -> Path:
    """The ImageNet ResNetV1c weights variant `name`'s recipe starts from (mmcv's `open-mmlab://resnet50_v1c`
    or `resnet101_v1c`), fetched once into the cache under their original name and sha256-checked.

    A file of that name already in the cache (placed by hand when offline) is checked and used.
    The `.pth` is kept as is: `train.engine.load_backbone_weights` reads it with `weights_only=True`.
    `url` fetches the same file from elsewhere (a mirror); it is checked against the published name.

    Example:
        >>> backbone_weights("isanet_r50-d8_512x1024_40k_cityscapes").name
        'resnet50_v1c-2cccc1ad.pth'
    """
    published = get_config(name).pretrained_url
    url = url or published
    file_name = _file_name(published)
    match = PUBLISH_HASH.search(file_name)
    expected_prefix = match.group(1) if match else None
    cache = get_cache_dir(cache_dir)
    dst = cache / file_name
    if dst.is_file() and not force:
        _check_hash(sha256_file(dst), expected_prefix, str(dst), placed=True)
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    with _fetch(url, cache, expected_prefix, f"{name}'s ImageNet backbone", progress,
                instead=f"--backbone-weights /path/to/{file_name}", place_as=file_name) as tmp:
        os.replace(tmp, dst)
    return dst


def resolve_weights(name: str, weights: Union[None, str, PathLike], *,
                    cache_dir: Optional[PathLike] = None, progress: bool = True) -> Optional[Path]:
    """The weights file for `create_model(name, weights=...)`: explicit file > cache > download.

    `weights` is None (random init: returns None), "auto" (cached or downloaded published weights;
    from the Hugging Face repo `$ISA_HF_MIRROR` when set), "hf-hub:OWNER/REPO[@REV]" (`hf_hub_weights`)
    or a path to a .safetensors/.pth file, which must exist.

    Example:
        >>> resolve_weights("isanet_r50-d8_512x1024_40k_cityscapes", "auto").suffix
        '.safetensors'
    """
    if weights is None:
        return None
    if isinstance(weights, str) and weights.startswith(HF_HUB_PREFIX):
        return hf_hub_weights(weights)
    if isinstance(weights, str) and weights == "auto":
        mirror = os.environ.get(ENV_HF_MIRROR)
        return cached_weights(name, cache_dir=cache_dir) or (
            mirror_weights(name, mirror) if mirror else download(name, cache_dir=cache_dir, progress=progress))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "weights file not found (use weights='auto' for the "
                                "published checkpoint)", str(path))
    return path


# --------------------------------------------------------------------------------------------
# Hugging Face Hub: `hf-hub:OWNER/REPO[@REV]` weights (what `isa push` uploads), and a mirror of the 16 variants

HF_HUB_PREFIX = "hf-hub:"
HF_WEIGHTS_FILE = "model.safetensors"
ENV_HF_MIRROR = "ISA_HF_MIRROR"
# huggingface_hub's repo id rules (ASCII; no "--" / ".." / leading or trailing "-" "."; 96 characters a part); a
# revision is a branch, tag or commit ("refs/pr/1"): it names a file under the cache's refs/, so no ".." in it
_HF_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HF_REPO = re.compile(rf"{_HF_PART}/{_HF_PART}")
_HF_REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def parse_hf_hub(spec: str) -> Tuple[str, Optional[str]]:
    """`hf-hub:OWNER/REPO[@REV]` (or `OWNER/REPO[@REV]`) -> (repo id, revision or None).

    Example:
        >>> parse_hf_hub("hf-hub:me/isanet-cats@v1")
        ('me/isanet-cats', 'v1')
    """
    body = spec[len(HF_HUB_PREFIX):] if spec.startswith(HF_HUB_PREFIX) else spec
    repo, _, revision = body.partition("@")
    if not _HF_REPO.fullmatch(repo) or (_ and not _HF_REVISION.fullmatch(revision)):
        raise ValueError(f"{spec!r} is not a Hugging Face model: write hf-hub:OWNER/REPO or hf-hub:OWNER/REPO@REVISION")
    return repo, revision or None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_weights(spec: str, filename: str = HF_WEIGHTS_FILE) -> Path:
    """`filename` of the Hugging Face model repo `spec` (`hf-hub:OWNER/REPO[@REV]`), through huggingface_hub's
    cache (`$HF_HUB_CACHE` / `$HF_HOME`): downloaded once, pinned by `@REV` (a branch, tag or commit).

    `HF_HUB_OFFLINE=1` uses the cache only; the token is huggingface_hub's (`HF_TOKEN`, `hf auth login`);
    `HF_ENDPOINT` picks another Hub. These are read when called. Needs the optional extra `hub`.

    Example:
        >>> hf_hub_weights("hf-hub:me/isanet-cats@v1").name
        'model.safetensors'
    """
    repo, revision = parse_hf_hub(spec)
    shown = f"{HF_HUB_PREFIX}{repo}" + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as exc:
        raise DownloadError(f"{shown}: loading from the Hugging Face Hub needs huggingface_hub: "
                            "pip install 'isa-triton[hub]'") from exc
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline,
                                    endpoint=os.environ.get("HF_ENDPOINT") or None,
                                    library_name="isa-triton"))
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"{shown}: no model repo {repo!r} on the Hub (or it is private and no token was given: "
                            "set HF_TOKEN or run `hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{shown}: the repo has no revision {revision!r} (a branch, tag or commit)") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise DownloadError(f"{shown}: {filename} is not in the Hugging Face cache {cache} and offline mode is on "
                                "(HF_HUB_OFFLINE=1); run once online to fill the cache, or pass a local "
                                "--weights FILE") from exc
        raise DownloadError(f"{shown}: cannot reach the Hub ({os.environ.get('HF_ENDPOINT') or constants.ENDPOINT}) "
                            f"and {filename} is not in the cache {cache}: {exc}") from exc
    except EntryNotFoundError as exc:
        raise DownloadError(f"{shown}: the repo has no {filename} (`isa push` uploads it)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"{shown}: download failed: {exc}") from exc


def mirror_weights(name: str, mirror: str) -> Path:
    """Variant `name`'s `<name>.safetensors` from the Hugging Face repo `mirror` (`$ISA_HF_MIRROR`,
    `OWNER/REPO[@REV]`), checked against the published checkpoint's sha256 prefix it records."""
    from .reader import read_metadata

    config = get_config(name)
    path = hf_hub_weights(mirror if mirror.startswith(HF_HUB_PREFIX) else HF_HUB_PREFIX + mirror,
                          filename=f"{name}.safetensors")
    recorded = read_metadata(path).get("source_sha256", "")
    if config.checkpoint_sha256_prefix and not recorded.startswith(config.checkpoint_sha256_prefix):
        raise DownloadError(f"{path} (from ${ENV_HF_MIRROR}={mirror}) records source sha256 {recorded[:8] or 'none'}, "
                            f"the published {name} checkpoint has {config.checkpoint_sha256_prefix}; the mirror holds "
                            "other weights")
    return path
