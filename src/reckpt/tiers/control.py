"""The persister's folder: promotion requests, the trainer's registration, the lock, the log.

The fastest tier's root holds ``.reckpt-tiers/`` (:data:`reckpt.tiers.config.CONTROL_DIR`),
one per node, through which the trainer and the persister process of that node talk:

=============================  =================================================================
entry                          what it is
=============================  =================================================================
``config.json``                the tiers and the node's place, written by the trainer (0600)
``trainer.json``               the trainer's pid, and whether it closed its manager
``requests/promote-<step>``    "copy step S from tier A to tiers [B, C]", written by the trainer
                               *before* the save starts, removed by the persister when done
``persister.lock``             held (``flock``) by the live persister: at most one per node
``persister.json``             the live persister's pid
``persister.log``              the persister's log
=============================  =================================================================

A request is written before its save, so a trainer killed right after the commit still has
its last checkpoint promoted; the persister waits while the save may still commit (the
trainer lives) and drops the request when it never will. Every file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from reckpt.commit.state import pid_alive
from reckpt.errors import ConfigError
from reckpt.storage.core import Storage, storage_for

__all__ = ["Control", "Request", "PERSISTER_FAULT_ENV", "LOCK_HELD_EXIT"]

PERSISTER_FAULT_ENV = "RECKPT_PERSISTER_FAULT_KILL_AT"
"""A test knob: the persister runs with ``RECKPT_FAULT_KILL_AT`` set to this variable's value
(the trainer's own fault knobs are never passed on)."""

LOCK_HELD_EXIT = 3
"""The exit status of a persister launch that found another persister holding the lock."""

_REQUEST_PREFIX = "promote-"
_LOCK_RETRY_S = 3.0


@dataclass(frozen=True)
class Request:
    """Copy the checkpoint of ``step`` from tier ``source`` to ``targets`` (slowest last).

    ``pid`` is the trainer that wrote it (0: unknown): its save may still commit while it lives.
    """

    step: int
    source: str
    targets: tuple[str, ...]
    created_at: float = 0.0
    attempts: int = 0
    pid: int = 0

    @property
    def name(self) -> str:
        return f"{_REQUEST_PREFIX}{self.step:012d}.json"

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["targets"] = list(self.targets)
        return json.dumps(doc).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Request:
        doc = json.loads(data.decode("utf-8"))
        targets = tuple(str(t) for t in doc["targets"])
        created, attempts, pid = float(doc["created_at"]), int(doc["attempts"]), int(doc.get("pid", 0))
        return cls(int(doc["step"]), str(doc["source"]), targets, created, attempts, pid)


class Control:
    """One node's persister folder (see the module table); a plain local path.

    Args:
        path: the folder (``TierSet.control_dir``).
    """

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self.storage = storage_for(self.path)
        self.requests_dir = Storage.join(self.path, "requests")

    def _file(self, name: str) -> str:
        return Storage.join(self.path, name)

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.storage.read_bytes(self._file(name)).decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def _write_json(self, name: str, doc: Mapping[str, Any]) -> None:
        self.storage.makedirs(self.path)
        self.storage.write_bytes_atomic(self._file(name), json.dumps(dict(doc)).encode("utf-8"))

    # -- configuration and the trainer ---------------------------------------------------
    def write_config(self, doc: Mapping[str, Any]) -> None:
        """The persister's configuration (tiers with their storage options: owner-only)."""
        self._write_json("config.json", doc)
        with contextlib.suppress(OSError):
            os.chmod(self._file("config.json"), 0o600)

    def config(self) -> dict[str, Any]:
        doc = self._read_json("config.json")
        if doc is None:
            raise ConfigError(f"{self._file('config.json')}: missing or unreadable persister configuration")
        return doc

    def register_trainer(self, pid: int | None = None) -> None:
        """The trainer of this node is ``pid`` (default: this process), and it is running."""
        doc = {"pid": os.getpid() if pid is None else pid, "host": socket.gethostname(), "closed": False}
        self._write_json("trainer.json", doc)

    def trainer_closed(self) -> None:
        """The trainer closed its manager: the persister exits once nothing is left to do."""
        doc = self._read_json("trainer.json") or {"pid": os.getpid(), "host": socket.gethostname()}
        self._write_json("trainer.json", {**doc, "closed": True})

    def trainer_alive(self, pid: int = 0) -> bool:
        """Whether the registered trainer may still save (running, its manager not closed).

        With ``pid`` (a request's writer): whether that trainer is the registered one and may
        still save; a request of an earlier trainer whose save never committed never will.
        """
        doc = self._read_json("trainer.json")
        if doc is None or doc.get("closed") or (pid and int(doc.get("pid", 0)) != pid):
            return False
        if doc.get("host") != socket.gethostname():
            return True  # not ours to judge: a folder seen from another machine
        return pid_alive(int(doc.get("pid", 0)))

    # -- requests ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.storage.makedirs(self.requests_dir)
        self.storage.write_bytes_atomic(Storage.join(self.requests_dir, request.name), request.to_json())

    def update(self, request: Request) -> None:
        self.add(request)

    def remove(self, step: int) -> None:
        self.storage.rm(Storage.join(self.requests_dir, Request(step, "", ()).name))

    def pending(self) -> list[Request]:
        """The requests not yet done, oldest step first (unreadable ones are skipped)."""
        out = []
        for name in self.storage.ls(self.requests_dir):
            if not (name.startswith(_REQUEST_PREFIX) and name.endswith(".json")):
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                out.append(Request.from_json(self.storage.read_bytes(Storage.join(self.requests_dir, name))))
        return sorted(out, key=lambda r: r.step)

    def pending_sources(self, tier: str) -> set[int]:
        """Steps of ``tier`` still to be copied: retention must keep them."""
        return {r.step for r in self.pending() if r.source == tier}

    # -- the persister process -------------------------------------------------------------
    @contextlib.contextmanager
    def persister_lock(self) -> Iterator[bool]:
        """Held by the persister for its lifetime; yields whether this process got it."""
        self.storage.makedirs(self.path)
        fd = os.open(self._file("persister.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + _LOCK_RETRY_S  # a trainer's probe holds it for an instant
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        got = False
                        break
                    time.sleep(0.05)
            if got:
                self._write_json("persister.json", {"pid": os.getpid(), "started_at": time.time()})
            yield got
        finally:
            os.close(fd)

    def persister_running(self) -> bool:
        """Whether a persister holds the lock (a shared probe: never blocks, never waits)."""
        path = self._file("persister.lock")
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def persister_pid(self) -> int | None:
        doc = self._read_json("persister.json")
        return None if doc is None else int(doc.get("pid", 0)) or None

    def start_persister(self, wait_s: float = 60.0) -> bool:
        """Start this node's persister unless one runs; returns whether this call started it.

        The persister is a detached process (its own session, a child of init), so that a
        SIGKILL of the trainer or of its process group leaves it running. Returns once it has
        taken its lock (or found another persister holding it).

        Raises:
            ChildProcessError: the persister could not be started (see its log).
        """
        if self.persister_running():
            return False
        self.storage.makedirs(self.path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECKPT_FAULT")}
        if os.environ.get(PERSISTER_FAULT_ENV):
            env["RECKPT_FAULT_KILL_AT"] = os.environ[PERSISTER_FAULT_ENV]
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        log = self._file("persister.log")
        with open(log, "ab") as out:
            done = subprocess.run(
                [sys.executable, "-m", "reckpt.tiers.persister", "--detach", self.path],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
                close_fds=True,
                timeout=wait_s,
            )
        if done.returncode not in (0, LOCK_HELD_EXIT):
            raise ChildProcessError(f"the tier persister did not start (exit {done.returncode}); see {log}")
        return done.returncode == 0

    def wait_idle(self, steps: Sequence[int] | None = None, timeout_s: float | None = None) -> bool:
        """Block until no request (or none of ``steps``) is pending; restarts a dead persister.

        Returns ``False`` on timeout.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            pending = {r.step for r in self.pending()}
            if steps is not None:
                pending &= set(steps)
            if not pending:
                return True
            if not self.persister_running():
                self.start_persister()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
