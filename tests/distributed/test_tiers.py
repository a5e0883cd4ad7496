"""Tiers under torchrun: a killed process or node resumes bitwise; a replaced machine resumes from S3.

Every job trains ``tiers_scenarios`` (one rank per process, gloo) with three tiers: a memory
tier (a folder standing for ``/dev/shm``) every 2 steps keeping 1, a local-disk tier every 4
keeping 2, and moto's S3 every 8 keeping 3. Two simulated nodes each run their own torchrun
(``--nnodes=2``, c10d rendezvous on 127.0.0.1) inside a mount namespace of their own, where
the node's folders are bind-mounted on one common path: the tiers' paths are the same on both
nodes and each node sees only its own files, as on machines without a shared filesystem.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from reckpt.tiers.config import Tier
from reckpt.tiers.control import Control
from tests.helpers import assert_state_dicts_equal
from tests.helpers.paths import REPO
from tests.helpers.processes import child_env, free_port

STEPS = 24
WORLD = 4


def _tiers(mount: str, durable: str) -> list[dict[str, Any]]:
    tiers = [
        Tier("memory", f"{mount}/shm/run", 2, keep=1),
        Tier("local", f"{mount}/disk/run", 4, keep=2),
        Tier("durable", durable, 8, keep=3),
    ]
    return [t.to_json() for t in tiers]


def _config(path: Path, tiers: list[dict[str, Any]], model_dir: str, out: Path, kill: Any = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"tiers": tiers, "model_dir": model_dir, "steps": STEPS, "rows": 500, "dim": 8, "kill": kill}
    path.write_text(json.dumps({**cfg, "out": str(out)}))
    return str(path)


def _finals(out: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"final-rank{r}.pt", weights_only=True) for r in range(world)]


def _resumed(out: Path, world: int) -> list[dict[str, Any]]:
    """What each rank resumed from last (torchrun's restart count, in the name, can differ by node)."""
    last = [
        max(out.glob(f"resume-r*-rank{r}.json"), key=lambda p: int(p.name.split("-")[1][1:]))
        for r in range(world)
    ]
    return [json.loads(p.read_text()) for p in last]


def _assert_same_run(a: Path, b: Path, world: int) -> None:
    for x, y in zip(_finals(a, world), _finals(b, world), strict=True):
        assert_state_dicts_equal(x["model"], y["model"])
        assert_state_dicts_equal(x["optimizer"]["state"], y["optimizer"]["state"])


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--monitor-interval=0.5", *args]


def _worker(cfg: str) -> list[str]:
    return ["-m", "tests.distributed.tiers_scenarios", "worker", cfg]


def _env(s3: dict[str, Any], **extra: str) -> dict[str, str]:
    # The workers keep a store of their own per round: torchrun's shared store still holds the
    # previous round's addresses after a restart, and a restarted gloo group would dial them.
    return child_env(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **s3["env"], **extra)


# -- one node ----------------------------------------------------------------------------------------


def test_a_killed_rank_resumes_from_memory_bitwise(tmp_path: Path, s3_server: dict[str, Any]) -> None:
    durable = f"s3://{s3_server['bucket']}/{tmp_path.name}"
    runs = {}
    for name, kill in (("reference", None), ("killed", {"step": 11, "ranks": [1], "restart": 0})):
        node = tmp_path / name
        cfg = _config(
            node / "cfg.json", _tiers(str(node), f"{durable}/{name}"), f"{durable}/{name}", node / "out", kill
        )
        cmd = _torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", *_worker(cfg))
        done = subprocess.run(cmd, env=_env(s3_server), cwd=REPO, capture_output=True, text=True, timeout=400)
        (node / "torchrun.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-6000:]
        runs[name] = node / "out"
    _assert_same_run(runs["reference"], runs["killed"], 2)
    resumed = _resumed(runs["killed"], 2)
    assert {r["step"] for r in resumed} <= {8, 10}, resumed  # at most one memory interval (and a save) lost
    assert [r["sources"] for r in resumed] == [["memory", "memory"]] * 2
    _wait_idle([Path(runs["killed"]).parent])


# -- two nodes ------------------------------------------------------------------------------------------


def _mount_namespaces_work(tmp_path: Path) -> bool:
    (tmp_path / "probe-src").mkdir()
    (tmp_path / "probe-dst").mkdir()
    script = f"mount --bind {tmp_path / 'probe-src'} {tmp_path / 'probe-dst'}"
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture
def two_nodes(tmp_path: Path) -> Path:
    if not _mount_namespaces_work(tmp_path):
        pytest.skip(
            "needs mount namespaces (unshare --mount, root) to give each simulated node its own folders"
        )
    return tmp_path


class Cluster:
    """Two simulated nodes, ``a`` and ``b``, each with its own folders under one mount point."""

    def __init__(self, root: Path, s3: dict[str, Any], name: str) -> None:
        self.root, self.s3, self.name = root / name, s3, name
        self.mount = self.root / "mnt"
        self.mount.mkdir(parents=True)
        for node in ("a", "b"):
            (self.root / node).mkdir()
        self.durable = f"s3://{s3['bucket']}/{root.name}-{name}"
        self.tiers = _tiers(str(self.mount), self.durable)
        self.out = self.root / "out"

    def node_tiers(self, node: str) -> list[Path]:
        """A node's own folders of the memory and local tiers."""
        return [self.root / node / "shm", self.root / node / "disk"]

    def run(self, kill: Any = None, max_restarts: int = 1, expect_ok: bool = True) -> None:
        cfg = _config(self.root / "cfg.json", self.tiers, self.durable, self.out, kill)
        port = free_port()
        procs = []
        for node in ("a", "b"):
            launch = _torchrun(
                "--nnodes=2",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=tiers-{self.name}",
                f"--max-restarts={max_restarts}",
                *_worker(cfg),
            )
            script = f"mount --bind {self.root / node} {self.mount} && exec {' '.join(launch)}"
            procs.append(
                subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                    env=_env(self.s3, TIERS_TEST_NODE=node),
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [p.communicate(timeout=900)[0] for p in procs]
        for node, log in zip(("a", "b"), logs, strict=True):
            (self.root / f"torchrun-{node}.log").write_text(log)
        if expect_ok:
            assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-5000:] for log in logs)
        _wait_idle([self.root / "a", self.root / "b"])


def _wait_idle(nodes: list[Path], timeout_s: float = 300.0) -> None:
    """Until no node's persister runs (it exits once its trainer is gone and its queue is empty)."""
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        control = Control(f"{node}/shm/run/.reckpt-tiers")
        while control.persister_running():
            assert time.monotonic() < deadline, f"{node}: the persister did not finish"
            time.sleep(0.1)


@pytest.fixture
def reference(two_nodes: Path, s3_server: dict[str, Any]) -> Cluster:
    cluster = Cluster(two_nodes, s3_server, "reference")
    cluster.run()
    return cluster


def test_a_killed_node_resumes_bitwise(reference: Cluster, s3_server: dict[str, Any]) -> None:
    cluster = Cluster(reference.root.parent, s3_server, "killed")
    cluster.run(kill={"step": 13, "node": "b", "restart": 0})
    _assert_same_run(reference.out, cluster.out, WORLD)
    resumed = _resumed(cluster.out, WORLD)
    # each node's memory holds its own ranks' files of step 12 (or 10, if 12 was still being
    # written): the nodes swap the files they lack and resume from memory, newer than S3's 8
    assert len({r["step"] for r in resumed}) == 1 and resumed[0]["step"] in (10, 12), resumed
    assert [r["tier"] for r in resumed] == ["memory"] * WORLD
    for r in resumed:
        sources = {src for by_source in r["parts"].values() for src in by_source}
        assert sources == {"memory", f"node {1 - _node_index(r, resumed)} memory"}, r["parts"]


def test_a_replaced_machine_resumes_from_s3(reference: Cluster, s3_server: dict[str, Any]) -> None:
    cluster = Cluster(reference.root.parent, s3_server, "replaced")
    cluster.run(kill={"step": 13, "node": "b", "restart": 0, "drain": True}, max_restarts=0, expect_ok=False)
    for folder in cluster.node_tiers("b"):  # a new machine: no memory, no local disk
        shutil.rmtree(folder)
    cluster.run()
    resumed = _resumed(cluster.out, WORLD)
    assert [r["step"] for r in resumed] == [8] * WORLD, resumed  # the last durable step
    # node a completes its local disk's part of step 8 from S3; the new machine reads S3
    assert {r["node"]: r["tier"] for r in resumed} == {"a": "local", "b": "durable"}, resumed
    for r in resumed:
        sources = {src for by_source in r["parts"].values() for src in by_source}
        assert sources == ({"local", "durable"} if r["node"] == "a" else {"durable"}), r["parts"]
    _assert_same_run(reference.out, cluster.out, WORLD)


def _node_index(r: dict[str, Any], resumed: list[dict[str, Any]]) -> int:
    """The node number of a rank's report: nodes are numbered by their lowest rank."""
    first = [x["node"] for x in resumed]
    return sorted(set(first), key=first.index).index(r["node"])
