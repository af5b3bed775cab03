"""Training checkpoints: atomic writes, newest-complete lookup with fallback, safe loading.

A checkpoint `WORK_DIR/checkpoints/iter_N.pt` is written after N finished iterations and holds
plain types and tensors only, so it loads with `torch.load(weights_only=True)` (checkpoints are
untrusted input): model / optimizer / scheduler / grad-scaler state, every rank's RNG states (uint8
tensors), the data position (iteration, epoch, offset as ints), the config (plain dict) and the
history of evaluations. Files are written to a temporary name, fsynced and renamed, so a run killed
mid-write leaves the previous checkpoint as the newest complete one.

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> p = save_checkpoint({"iteration": 2, "model": {"w": torch.ones(1)}}, d, 2)
    >>> latest = load_latest_checkpoint(d); latest[1] == p, latest[0]["iteration"]
    (True, 2)
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from zoo.reader import check_finite
from zoo.utils import atomic_write

log = logging.getLogger(__name__)

FORMAT = "isa-triton-train"
VERSION = 1
_NAME = re.compile(r"^iter_(\d+)\.pt$")
PathLike = Union[str, os.PathLike]


def checkpoint_dir(work_dir: PathLike) -> Path:
    return Path(work_dir) / "checkpoints"


def checkpoint_path(work_dir: PathLike, iteration: int) -> Path:
    return checkpoint_dir(work_dir) / f"iter_{iteration}.pt"


def fault_point(stage: str, iteration: int) -> None:
    """Fault injection for the crash tests: signal this process at a chosen point.

    ISA_TRAIN_KILL_AT="iter:N" sends SIGKILL during iteration N (after its backward, before the optimizer
    step); "write:N" after checkpoint N's temporary file is written, before its rename; "micro:N" between the
    first two micro-batches of iteration N (--accum-steps); "eval:N" as the evaluation of iteration N starts.
    ISA_TRAIN_INTERRUPT_AT takes the same values and sends SIGINT instead (a Ctrl-C at that point).
    """
    import signal

    where = f"{stage}:{iteration}"
    if os.environ.get("ISA_TRAIN_INTERRUPT_AT") == where:
        os.kill(os.getpid(), signal.SIGINT)
    if os.environ.get("ISA_TRAIN_KILL_AT") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(state: Dict[str, Any], work_dir: PathLike, iteration: int) -> Path:
    """Write `state` (plus format tags) atomically as `work_dir/checkpoints/iter_{iteration}.pt`."""
    state = {"format": FORMAT, "version": VERSION, **state, "iteration": int(iteration)}
    return atomic_write(checkpoint_path(work_dir, iteration), lambda f: torch.save(state, f),
                        before_rename=lambda: fault_point("write", iteration))


def list_checkpoints(work_dir: PathLike) -> List[Tuple[int, Path]]:
    """(iteration, path) of every `iter_N.pt` in the work dir, newest first (temporaries ignored)."""
    folder = checkpoint_dir(work_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load one training checkpoint with `weights_only=True`; raise ValueError when it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, forbidden global: all mean "unusable"
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an isa-triton training checkpoint (no format tag {FORMAT!r}); "
                         "to start from model weights use --weights instead of --resume")
    for key in ("iteration", "model"):
        if key not in state:
            raise ValueError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    check_finite(state["model"], path)  # a ValueError naming the tensor: --resume falls back past it
    return state


def load_latest_checkpoint(work_dir: PathLike, map_location: Union[str, torch.device] = "cpu"
                           ) -> Optional[Tuple[Dict[str, Any], Path]]:
    """The newest checkpoint that loads, falling back (with a warning) past unreadable ones; None if none."""
    for _, path in list_checkpoints(work_dir):
        try:
            return load_checkpoint(path, map_location), path
        except ValueError as exc:
            message = f"skipping corrupt checkpoint {path}: {exc}; falling back to the previous one"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
    return None


def remove_stale_temporaries(work_dir: PathLike) -> List[Path]:
    """Delete temporary files left by writers that were killed mid-write; returns what was removed."""
    folder = checkpoint_dir(work_dir)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".iter_") and ".tmp-" in p.name:
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def prune_checkpoints(work_dir: PathLike, keep: int, current: Optional[int] = None) -> None:
    """Delete all but the `keep` newest checkpoints (keep <= 0 keeps everything, like MMSeg).

    `current`: the iteration just saved. Checkpoints past it (left by a timeline a resume fell back from,
    e.g. an unreadable newest one) neither count nor go: counting them would delete the checkpoint just
    written and the one resumed from; the run replaces them as it reaches their iterations."""
    if keep <= 0:
        return
    for _, path in [c for c in list_checkpoints(work_dir) if current is None or c[0] <= current][keep:]:
        try:
            path.unlink()
        except OSError:
            pass


def rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors (CPU, and the current CUDA device when used)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8), device)
