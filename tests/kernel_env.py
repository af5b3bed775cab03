"""Pytest plugin: each Triton test module runs in the Triton mode it needs, in a child pytest if need be.

Triton decides when it is imported whether its jit functions compile or run in its interpreter
(TRITON_INTERPRET=1), so one process cannot do both: the interpreter tests need the variable set
before Triton is imported, the sm_90 compile tests need it unset. A test module states its mode:

    pytest_plugins = ("kernel_env",)
    TRITON_MODE = "interpret"  # or "compile"

Its tests run in this process when it is in that mode (`TRITON_INTERPRET=1 pytest tests/test_kernels.py`
runs them here). Otherwise, at the first of them, one child `pytest` with the variable set (or unset)
runs every selected test of that mode, and this process reports the child's setup, call and teardown
reports of each test as its own (outcomes, tracebacks, durations), as pytest-xdist does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import pytest

_REPORT = "ISA_KERNEL_ENV_REPORT"  # set in the child: the file it writes its test reports to
_WHERE = {"interpret": "with TRITON_INTERPRET=1", "compile": "without TRITON_INTERPRET"}
_reports: Dict[str, List[dict]] = {}  # node id -> serialised reports (parent: the child's; child: its own)
_config: Optional[pytest.Config] = None


def process_mode() -> str:
    """'interpret' when this process runs Triton kernels in the interpreter, else 'compile'."""
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    return "interpret" if interpret else "compile"


def _mode(item: pytest.Item) -> Optional[str]:
    return getattr(getattr(item, "module", None), "TRITON_MODE", None)


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def _run_child(session: pytest.Session, mode: str) -> None:
    items = [item for item in session.items if _mode(item) == mode]
    env = dict(os.environ)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    fd, path = tempfile.mkstemp(prefix="kernel_env_", suffix=".json")
    os.close(fd)
    env[_REPORT] = path
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               *(item.nodeid for item in items)]
    try:
        proc = subprocess.run(command, cwd=session.config.rootpath, env=env, capture_output=True, text=True)
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    _reports.update(json.loads(text) if text else {})
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    for item in items:  # a test the child did not finish (it crashed): a failure with its output's tail
        reports = _reports.setdefault(item.nodeid, [])
        if not reports or reports[-1]["when"] != "teardown":
            text = f"the child pytest ({_WHERE[mode]}, exit code {proc.returncode}) did not finish this test:\n{tail}"
            when = "teardown" if any(r["when"] == "call" for r in reports) else "call"
            lost = pytest.TestReport(item.nodeid, item.location, {}, "failed", text, when)
            reports.append(session.config.hook.pytest_report_to_serializable(config=session.config, report=lost))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Optional[bool]:
    """Run the test here (None), or replay the child's reports of it (True)."""
    mode = _mode(item)
    if mode is None or mode == process_mode():
        return None
    if item.nodeid not in _reports:
        _run_child(item.session, mode)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for data in _reports[item.nodeid]:
        report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        report.location = tuple(report.location)  # JSON made the tuples lists
        if isinstance(report.longrepr, list):  # a skip's (file, line, reason)
            report.longrepr = tuple(report.longrepr)
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the child: keep every report of every test, written out after each one (a crash loses none)."""
    path = os.environ.get(_REPORT)
    if not path or _config is None:
        return
    _reports.setdefault(report.nodeid, []).append(
        _config.hook.pytest_report_to_serializable(config=_config, report=report))
    with open(path, "w") as f:
        json.dump(_reports, f)
