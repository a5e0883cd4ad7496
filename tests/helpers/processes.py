"""Child processes of this checkout: the ``reckpt`` CLI, Python scripts and worker modules."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from os import PathLike
from typing import Any

from tests.helpers.paths import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: ``PYTHONPATH`` names this checkout's ``src/`` and
    root (so ``tests`` imports), no fault point is inherited (``RECKPT_FAULT_*``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECKPT_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env.update(extra)
    return env


def run_python(
    *argv: str,
    env: dict[str, str] | None = None,
    cwd: str | PathLike[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` in :func:`child_env` (plus ``env``), its output captured as text."""
    return subprocess.run(
        [sys.executable, *argv],
        env=child_env(**(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def reckpt_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m reckpt.cli ARGS`` (``env``, ``cwd``, ``timeout`` as for :func:`run_python`)."""
    return run_python("-m", "reckpt.cli", *args, **kwargs)


def run_worker(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the repository root, e.g. a worker a fault point may SIGKILL
    (``env={"RECKPT_FAULT_KILL_AT": ...}``)."""
    return run_python("-m", module, *args, env=env, cwd=REPO, timeout=180)
