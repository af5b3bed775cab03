"""Shared fixtures of the test suite."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict

import pytest

REPO = Path(__file__).resolve().parents[1]
# what a parent pytest may carry that would change a child training process
_CHILD_UNSET = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ISA_TRAIN_KILL_AT",
               "ISA_TRAIN_INTERRUPT_AT")


@pytest.fixture
def free_disk(tmp_path):
    """Delete tmp_path right after the test: an R-50 training checkpoint is ~300 MB."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def child_env() -> Callable[..., Dict[str, str]]:
    """Environment for a child `python -m train` / torchrun: one thread, the repo importable, no
    inherited distributed or kill-switch variables; keyword arguments are added."""

    def make(**extra: str) -> Dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for key in _CHILD_UNSET:
            env.pop(key, None)
        env.update(extra)
        return env

    return make


@pytest.fixture(scope="session")
def baseline_library(tmp_path_factory):
    """The native loops built without -march=native: no FMA instructions on x86-64, so the fused
    multiply-adds take native.c's other path."""
    from train import native

    mp = pytest.MonkeyPatch()
    mp.setattr(native, "TUNING", ())
    try:
        return native.load(native.build(tmp_path_factory.mktemp("baseline")))
    finally:
        mp.undo()
