"""Crash injection: SIGKILL a saving job at storage operation ``k`` and check what survives.

One *scenario* is a backend (local disk or ``s3://`` on a moto server), a save mode (sync or
async) and a world size (1 or 2 processes, gloo). A *trial* forks the writer processes
(the parent has torch imported already, so a trial costs a fork, not an interpreter start),
each runs one step of a run's checkpoint cycle through :class:`reckpt.CheckpointManager`
(save, eval result + metrics sidecar, retention keeping 2, close), and the target rank
SIGKILLs itself before its storage operation ``k`` (``RECKPT_FAULT_KILL_AT=op:<k>``); the
parent then kills the other rank, as a launcher tears a job down.

``k`` is drawn with a fixed seed from a traced clean run, phase by phase, so that every
phase of the commit protocol is hit (:func:`reckpt.storage.hooks.op_phase`); the phase reported
is the one of the operation actually killed, read back from the trace.

After every kill the parent checks, with the library's own calls:

* every checkpoint that looks committed verifies (nothing looks committed but is not);
* the newest committed checkpoint restores bit-exact (model and optimizer);
* no checkpoint retention had to keep is gone (*lost*);
* the next start's cleanup (:func:`reckpt.commit.removal.cleanup_stale`, taking over the dead
  job's writer lock) leaves no debris: no staging or trash directory, no incomplete
  ``model.ckpt-*`` holding anything of reckpt's, no temporary sidecar file;
* no foreign entry is lost: every even step's target folder holds a user's files before
  the save (so half the saves replace a folder's own entries and must keep the rest, as
  TorchEasyRec users expect), and the model_dir holds some too; all of them must survive
  every kill and cleanup byte for byte (*foreign_lost*).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import reckpt
from reckpt.commit.removal import cleanup_stale
from reckpt.commit.state import checkpoint_state
from reckpt.commit.writer_lock import model_dir_lock
from reckpt.lifecycle.discovery import committed_steps
from reckpt.ownership import foreign_names
from reckpt.storage.core import TMP_INFIX, Storage, storage_for
from reckpt.storage.hooks import reset_op_count
from reckpt.testing.kill_points import PHASES, op_phase

KEEP = 2
TRIAL_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Scenario:
    backend: str  # "local" or "s3"
    mode: str  # "sync" or "async"
    world: int  # 1 or 2

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.mode}/{self.world}p"


SCENARIOS = [Scenario(b, m, w) for b in ("local", "s3") for m in ("sync", "async") for w in (1, 2)]


class Tiny(nn.Module):
    """A recommender in miniature: an embedding table and a linear tower."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 8)
        self.tower = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.tower(self.emb(ids))
        return out


def model_at(step: int) -> tuple[Tiny, torch.optim.Adam]:
    """The model and optimizer a run holds at ``step`` (deterministic, one Adam step)."""
    torch.manual_seed(step)
    m = Tiny()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    m(torch.arange(16) % 64).pow(2).mean().backward()
    opt.step()
    return m, opt


def _cycle(root: str, step: int, mode: str, world: int, rank: int, store: str) -> None:
    """One checkpoint cycle of a run, in a forked writer process."""
    if world > 1:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
    model, opt = model_at(step)
    mgr = reckpt.CheckpointManager(root, keep_checkpoint_max=KEEP, async_save=mode == "async")
    mgr.save(step, model, opt, dataloader_state={"part:0": step})
    if mode == "async":
        with torch.no_grad():  # training goes on while the background thread writes
            for p in model.parameters():
                p.mul_(0.5)
    mgr.record_eval(step, {"auc": 0.5 + step / 1000})
    mgr.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _fork_writer(
    root: str, step: int, sc: Scenario, rank: int, store: str, trace: str, kill_at: int | None
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the child: never returns into the parent's code
        log = os.open(
            os.path.join(os.path.dirname(trace), "writers.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )
        os.dup2(log, 1)
        os.dup2(log, 2)  # a surviving rank's gloo error is expected noise
        os.environ["RECKPT_FAULT_TRACE"] = trace
        os.environ.pop("RECKPT_FAULT_KILL_AT", None)
        if kill_at is not None:
            os.environ["RECKPT_FAULT_KILL_AT"] = f"op:{kill_at}"
        reset_op_count()
        _cycle(root, step, sc.mode, sc.world, rank, store)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _wait_job(pids: list[int], target: int) -> dict[int, int]:
    """Wait for the job; once the target rank dies by a signal, SIGKILL the others."""
    status: dict[int, int] = {}
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while len(status) < len(pids):
        for i, pid in enumerate(pids):
            if i in status:
                continue
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status[i] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        if (target in status and status[target] < 0) or time.monotonic() > deadline:
            for i, pid in enumerate(pids):
                if i not in status:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status[i] = -signal.SIGKILL if target in status else -999
        time.sleep(0.002)
    return status


def run_job(
    root: str, step: int, sc: Scenario, workdir: str, kill_at: int | None = None, target: int = 0
) -> tuple[dict[int, int], list[tuple[int, str, str]]]:
    """Fork the job's writers; returns exit status per rank and the target rank's op trace."""
    tag = f"{step}-{time.monotonic_ns()}"
    store = os.path.join(workdir, f"store-{tag}")
    traces = [os.path.join(workdir, f"trace-{tag}-{r}") for r in range(sc.world)]
    pids = [
        _fork_writer(root, step, sc, r, store, traces[r], kill_at if r == target else None)
        for r in range(sc.world)
    ]
    status = _wait_job(pids, target)
    ops = []
    if os.path.exists(traces[target]):
        with open(traces[target]) as f:
            for line in f:
                k, kind, path = line.rstrip("\n").split("\t", 2)
                ops.append((int(k), kind, path))
    for t in traces:
        with contextlib.suppress(FileNotFoundError):
            os.remove(t)
    return status, ops


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def restores_bit_exact(ckpt: str, step: int) -> bool:
    """Whether ``ckpt`` restores exactly the model and optimizer the run held at ``step``."""
    want_m, want_o = model_at(step)
    torch.manual_seed(12345)
    m = Tiny()
    o = torch.optim.Adam(m.parameters(), lr=0.5)
    reckpt.restore_model(ckpt, m, o)
    sa, sb = o.state_dict()["state"], want_o.state_dict()["state"]
    return (
        _same(m.state_dict(), want_m.state_dict())
        and sa.keys() == sb.keys()
        and all(_same(sa[i], sb[i]) for i in sa)
    )


def debris(st: Storage, root: str) -> list[str]:
    """What a clean model_dir must not hold: staging, trash, incomplete checkpoints, temp files."""
    out = []
    for name in st.ls(root):
        path = Storage.join(root, name)
        if name.startswith((".reckpt-staging.", ".reckpt-trash.")):
            out.append(name)
        elif name.startswith("model.ckpt-"):
            if checkpoint_state(st, path) != "committed":
                mine = set(st.ls(path)) - set(foreign_names(st.ls(path)))
                out += [f"{name}/{n}" for n in sorted(mine)]  # a user's files alone are no debris
            else:
                out += [f"{name}/{n}" for n in st.ls(path) if TMP_INFIX in n]
    return out


@dataclass(slots=True)
class Tally:
    trials: int = 0
    kills: int = 0
    no_kill: int = 0
    by_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    verified: int = 0
    restored_bit_exact: int = 0
    lost: int = 0
    looks_committed_but_not: int = 0
    debris_cleaned: int = 0
    debris_left: int = 0
    foreign_checked: int = 0
    foreign_lost: int = 0
    handled: int = 0  # kills after which every check passed
    failures: list[str] = field(default_factory=list)


def check_after_kill(st: Storage, root: str, before: list[int], new_step: int, tally: Tally) -> list[int]:
    """The checks after one kill; returns the committed steps after cleanup."""
    failures_before = len(tally.failures)
    steps = committed_steps(root, st)
    for s in steps:
        ckpt = Storage.join(root, f"model.ckpt-{s}")
        report = reckpt.verify(ckpt)
        if report.ok:
            tally.verified += 1
        else:
            tally.looks_committed_but_not += 1
            tally.failures.append(f"{ckpt}: committed but does not verify: {report.problems}")
    prunable = set(before[: -(KEEP - 1)]) if new_step in steps else set()
    for s in before:
        if s not in steps and s not in prunable:
            tally.lost += 1
            tally.failures.append(f"{root}: step {s} lost (before: {before}, after: {steps})")
    if steps:
        if restores_bit_exact(Storage.join(root, f"model.ckpt-{steps[-1]}"), steps[-1]):
            tally.restored_bit_exact += 1
        else:
            tally.failures.append(f"{root}: step {steps[-1]} does not restore bit-exact")
    # The next start: take over the dead job's lock and clean the debris, as a save does.
    found = debris(st, root)
    with model_dir_lock(st, root):
        cleanup_stale(st, root)
    left = debris(st, root)
    tally.debris_cleaned += len(found) - len(left)
    if left:
        tally.debris_left += len(left)
        tally.failures.append(f"{root}: debris left after cleanup: {left}")
    tally.handled += int(len(tally.failures) == failures_before)
    return committed_steps(root, st)


def plant_foreign(st: Storage, folder: str, tag: str, planted: dict[str, bytes]) -> None:
    """Write a user's files (a file and one in a subfolder) into ``folder``; remember them."""
    for rel in (f"notes-{tag}.txt", f"mine-{tag}/data.bin"):
        path = Storage.join(folder, rel)
        data = f"{tag}: {rel}\n".encode() + os.urandom(32)
        st.write_bytes(path, data)
        planted[path] = data


def check_foreign(st: Storage, planted: dict[str, bytes], tally: Tally) -> None:
    """Every planted file must still be there, byte for byte."""
    for path, data in planted.items():
        tally.foreign_checked += 1
        try:
            same = st.read_bytes(path) == data
        except FileNotFoundError:
            same = False
        if not same:
            tally.foreign_lost += 1
            tally.failures.append(f"{path}: a foreign file was lost or changed")


def run_scenario(
    sc: Scenario, root: str, workdir: str, kills: int, rng: random.Random, tally: Tally, first_phase: int = 0
) -> None:
    """Warm up a model_dir with clean cycles, then ``kills`` killed cycles.

    The phases are visited in turn, starting at ``first_phase`` (the caller passes the kills
    done so far, so that a few kills per scenario still hit every phase over all scenarios);
    the operation killed within a phase is drawn from ``rng``.
    """
    st = storage_for(root)
    plan: list[tuple[int, str, str]] = []
    planted: dict[str, bytes] = {}
    plant_foreign(st, root, "model_dir", planted)
    plant_foreign(st, Storage.join(root, "model.ckpt-7-notes"), "beside", planted)
    for step in (1, 2, 3):  # the third cycle prunes: its trace has every phase
        if step % 2 == 0:
            plant_foreign(st, Storage.join(root, f"model.ckpt-{step}"), str(step), planted)
        status, plan = run_job(root, step, sc, workdir)
        if any(status.values()):
            raise RuntimeError(f"{sc.name}: clean cycle at step {step} failed: {status}")
    phases = [p for p in PHASES if p != "other" and any(op_phase(kd, pa) == p for _, kd, pa in plan)]
    steps = committed_steps(root, st)
    step = 4
    done = attempts = 0
    while done < kills and attempts < 3 * kills:
        attempts += 1
        phase = phases[(first_phase + done) % len(phases)]
        candidates = [k for k, kd, pa in plan if op_phase(kd, pa) == phase]
        k = rng.choice(candidates)
        target = 1 if sc.world > 1 and phase == "data" and rng.random() < 0.5 else 0
        if target == 1:
            k = rng.randint(1, 6)  # rank 1 writes only data: a handful of operations
        if step % 2 == 0:
            plant_foreign(st, Storage.join(root, f"model.ckpt-{step}"), str(step), planted)
        status, ops = run_job(root, step, sc, workdir, kill_at=k, target=target)
        tally.trials += 1
        if status.get(target) != -signal.SIGKILL:
            tally.no_kill += 1
            steps = committed_steps(root, st)
            step += 1
            continue
        killed = ops[-1] if ops else (k, "?", "?")
        tally.kills += 1
        tally.by_phase[op_phase(killed[1], killed[2])] += 1
        done += 1
        steps = check_after_kill(st, root, steps, step, tally)
        check_foreign(st, planted, tally)
        step += 1
