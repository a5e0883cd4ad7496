"""Copy-free snapshot for async saves: a forked process writes the frozen tensor data.

``os.fork`` gives the child the parent's memory as it is at that instant, shared
copy-on-write: the kernel copies a page only when one side later writes to it. An async
save therefore forks (milliseconds: page tables are copied, not data) and returns; the
training process goes on updating its weights while the child still sees them as they
were. Pages the parent rewrites while the child lives cost one page copy each, paid by
the writing step instead of the save; pages it does not touch (most embedding rows between
two saves) cost nothing.

Only the bytes move to the child. Everything that needs collectives (DCP's planning,
``.metadata``, the manifest and the commit) stays in the parent's background save thread,
on its gloo group, exactly as with a copied snapshot. For each part the parent sends the
child DCP's final plan; the child resolves the items against its frozen state dicts,
writes, hashes and fsyncs the files in its own process (no GIL shared with training),
and sends back DCP's write results and the file records. A child that fails sends its
error; one that dies is noticed by the closed pipe. Either way the save is aborted like
any other failed save.

The structure of the state (its dicts and lists, stateful objects turned into their state
dicts, plain values copied) is fixed before the fork, so the parent plans on exactly what
the child writes, whatever the training does to its containers meanwhile. Tensors in
shared memory (``share_memory_()``) are not copy-on-write: they are copied at that point.

Limits: every tensor must live in host memory (a GPU tensor cannot be read by the child),
and the save must be taken from the thread that keeps running the training (the child
is killed if that thread or the process exits). A child that is alive but does not answer
(a lock held at fork time by another thread of the parent) is killed when the save is
closed, after :data:`CLOSE_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import logging
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing import Pipe
from typing import Any

import torch
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from reckpt.dcp.writer import ReckptSavePlanner, ReckptWriter
from reckpt.errors import ConfigError, SnapshotProcessError
from reckpt.format.integrity import FileRecord
from reckpt.storage.core import Storage

__all__ = ["ForkSnapshot", "fork_supported", "host_only", "visible_to_child"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
CLOSE_TIMEOUT_S = 60.0
"""How long :meth:`ForkSnapshot.close` waits for the child to exit before killing it."""


def fork_supported() -> bool:
    """Whether this platform can take a fork snapshot (POSIX ``fork``; Linux for parent-death)."""
    return hasattr(os, "fork") and hasattr(os, "register_at_fork")


def visible_to_child(storage: Storage) -> bool:
    """Whether a child process's writes reach the parent's view of ``storage`` (not ``memory://``)."""
    protocol = storage.fs.protocol
    return "memory" not in (protocol if isinstance(protocol, tuple) else (protocol,))


def host_only(parts: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether every tensor of ``parts`` (plain, ShardedTensor, DTensor) is in host memory."""

    def ok(value: Any) -> bool:
        if isinstance(value, dict):
            return all(ok(v) for v in value.values())
        if isinstance(value, list | tuple):
            return all(ok(v) for v in value)
        if callable(getattr(value, "local_shards", None)):
            return all(s.tensor.device.type == "cpu" for s in value.local_shards())
        if callable(getattr(value, "to_local", None)):
            return bool(value.to_local().device.type == "cpu")
        if isinstance(value, torch.Tensor):
            return value.device.type in ("cpu", "meta")
        return True

    return all(ok(sd) for _, sd in parts)


def _frozen(value: Any) -> Any:
    """``value``'s structure fixed now: new containers, stateful objects as their state dicts,
    plain values copied, tensors by reference (those in shared memory copied)."""
    if isinstance(value, torch.Tensor):
        if type(value) is torch.Tensor and value.device.type == "cpu" and value.untyped_storage().is_shared():
            return value.detach().clone()
        return value
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_frozen(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return _frozen(value.state_dict())  # what DCP would save for a Stateful value
    return copy.deepcopy(value)


class ForkSnapshot:
    """The state of ``parts`` frozen in a child process, which writes it on request.

    Created by the training thread at save time (the stall is the ``fork``); used by the
    background save thread (:meth:`writer` per part, then :meth:`close`). Local to a rank:
    each rank forks its own child and no collective is involved.

    Args:
        parts: ``[(directory name, state_dict)]`` referring to the live tensors.
        is_coordinator: whether this is rank 0 (DCP's planners treat it specially).

    Attributes:
        parts: the frozen structure of ``parts``: plan the save on these.

    Raises:
        ConfigError: a tensor is not in host memory.
        SnapshotProcessError: the process could not be forked.
    """

    def __init__(self, parts: list[tuple[str, dict[str, Any]]], is_coordinator: bool) -> None:
        self.parts = [(name, _frozen(sd)) for name, sd in parts]
        if not host_only(self.parts):
            raise ConfigError(
                'async_snapshot="fork" needs every tensor in host memory; this state has tensors'
                ' on an accelerator: use async_snapshot="copy" instead'
            )
        die_with_parent = threading.current_thread() is threading.main_thread()
        ours, theirs = Pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            raise SnapshotProcessError(
                f'could not fork the snapshot process ({e}); use async_snapshot="copy"'
            ) from e
        if pid == 0:  # the child: never returns
            code = 1
            try:
                ours.close()
                code = _serve(theirs, dict(self.parts), is_coordinator, parent, die_with_parent)
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._conn: multiprocessing.connection.Connection | None = ours
        self._status: int | None = None

    def writer(
        self, name: str, path: str, storage: Storage, rel_prefix: str, thread_count: int
    ) -> ReckptWriter:
        """The DCP storage writer of part ``name`` whose data the child writes."""
        return _ForkedWriter(self, name, path, storage, rel_prefix, thread_count)

    def write(
        self, name: str, args: tuple[str, Storage, str, int], plan: SavePlan
    ) -> tuple[list[WriteResult], dict[str, FileRecord]]:
        """Have the child write this rank's items of part ``name``; its results and file records."""
        if self._conn is None:
            raise SnapshotProcessError(f"the snapshot process {self.pid} was already closed")
        try:
            self._conn.send(("write", name, args, plan))
            while not self._conn.poll(1.0):
                if self._reaped():
                    raise EOFError("the snapshot process exited without an answer")
            reply = self._conn.recv()
        except (EOFError, OSError) as e:
            raise SnapshotProcessError(
                f"the snapshot process {self.pid} writing part {name!r} {self._death()}; the save is"
                " aborted (committed checkpoints are untouched)"
            ) from e
        if reply[0] == "ok":
            return reply[1], reply[2]
        logger.error("the snapshot process %d failed writing part %r:\n%s", self.pid, name, reply[3])
        raise _rebuild_error(reply[1], reply[2])

    def close(self) -> None:
        """Let the child exit and reap it, killing it after :data:`CLOSE_TIMEOUT_S` (idempotent)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._conn.close()
            self._conn = None
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while not self._reaped():
            if time.monotonic() > deadline:
                logger.warning("the snapshot process %d did not exit; killing it", self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)

    def _reaped(self) -> bool:
        """Whether the child has exited (and is reaped); never blocks."""
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored)
                self._status = -1
            else:
                if pid != 0:
                    self._status = status
        return self._status is not None

    def _death(self) -> str:
        with contextlib.suppress(ChildProcessError):
            if self._status is None:
                self._status = os.waitpid(self.pid, 0)[1]
        status = self._status
        if status is not None and os.WIFSIGNALED(status):
            return f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
        if status is not None and os.WIFEXITED(status):
            return f"exited with status {os.WEXITSTATUS(status)}"
        return "went away"


class _ForkedWriter(ReckptWriter):
    """:class:`ReckptWriter` whose ``write_data`` runs in the snapshot's child process."""

    def __init__(
        self,
        snapshot: ForkSnapshot,
        name: str,
        path: str,
        storage: Storage,
        rel_prefix: str,
        thread_count: int,
    ) -> None:
        super().__init__(path, storage, rel_prefix, thread_count)
        self._snapshot = snapshot
        self._name = name
        self._args = (path, storage, rel_prefix, thread_count)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results, records = self._snapshot.write(self._name, self._args, plan)
        self.records.update(records)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


def _serve(
    conn: multiprocessing.connection.Connection,
    parts: dict[str, dict[str, Any]],
    is_coordinator: bool,
    parent: int,
    die_with_parent: bool,
) -> int:
    """The child's loop: write the parts the parent asks for, until it says stop or goes away."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C or preemption notice is the parent's
        signal.signal(sig, signal.SIG_IGN)  # to handle; the child goes when the parent does
    if die_with_parent:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        with contextlib.suppress(AttributeError):
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 1
    torch.set_num_threads(1)  # the parent's OpenMP pool does not exist in the child
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return 1
        if request is None:
            return 0
        _, name, (path, storage, rel_prefix, threads), plan = request
        try:
            planner = ReckptSavePlanner()
            planner.set_up_planner(parts[name], None, is_coordinator)
            writer = ReckptWriter(path, storage, rel_prefix, threads)
            writer.per_thread_copy_ahead = 0  # DCP's GPU copy-ahead would initialise CUDA here
            results = writer.write_data(plan, planner).wait()
            conn.send(("ok", results, dict(writer.records)))
        except Exception as e:
            where = f"raised in the snapshot process {os.getpid()} writing part {name!r}"
            conn.send(("error", e if _rebuildable(e) else None, where, traceback.format_exc()))
            return 1


def _rebuildable(error: Exception) -> bool:
    """Whether ``error`` survives the pipe (an exception class with required arguments may not)."""
    try:
        return isinstance(pickle.loads(pickle.dumps(error)), Exception)
    except Exception:
        return False


def _rebuild_error(error: Exception | None, where: str) -> Exception:
    """The child's exception as raised (an OSError stays one), noting where; else a description."""
    if error is not None:
        error.add_note(where)
        return error
    return SnapshotProcessError(f"{where} failed (its error could not be sent back; see the log)")
