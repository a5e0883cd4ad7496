"""Storage faults, corruption and hostile checkpoints, counted for the reliability report.

Each function runs its trials in this process against real files (and, for S3, a moto
server behind :class:`reckpt.testing.faults.FaultProxy`) and returns a tally: trials, faults
injected, faults detected (retried to success, or a clear error naming the file), and
checkpoints lost (a checkpoint that verified before the trial and does not after).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import resource
import shutil
from typing import Any

import torch

import reckpt
from benchmarks.kill_harness import Tiny, model_at, restores_bit_exact
from reckpt.commit.state import checkpoint_state
from reckpt.errors import CheckpointError, IntegrityError, ShapeMismatchError, UnsafeCheckpointError
from reckpt.format.eval_results import (
    TRAIN_EVAL_RESULT_FILENAME,
    append_eval_result,
    cross_check_eval_results,
    write_checkpoint_metrics,
)
from reckpt.format.manifest import _self_checksum
from reckpt.storage.core import StorageError, storage_for
from reckpt.testing.faults import Fault, FaultInjector, FaultProxy

PLAN = {"emb": {"weight": {"sharding_type": "table_wise", "compute_kernel": "dense", "ranks": [0]}}}


def _tally(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": 0, "injected": 0, "detected": 0, "lost": 0, "failures": []}
    out.update(kw)
    return out


def _intact(root: str, step: int) -> bool:
    """Whether ``model.ckpt-<step>`` exists, verifies and restores bit-exact (never raises)."""
    ckpt = f"{root}/model.ckpt-{step}"
    try:
        report = reckpt.verify(ckpt)
        if not report.ok:
            logging.getLogger(__name__).warning("%s does not verify: %s", ckpt, report.problems)
        return report.ok and restores_bit_exact(ckpt, step)
    except (reckpt.errors.CheckpointError, OSError) as e:
        logging.getLogger(__name__).warning("%s: %s: %s", ckpt, type(e).__name__, e)
        return False


def _nothing_half_visible(root: str) -> bool:
    """Every ``model.ckpt-*`` that looks committed verifies."""
    st = storage_for(root)
    for name in st.ls(root):
        path = f"{root}/{name}"
        committed = name.startswith("model.ckpt-") and checkpoint_state(st, path) == "committed"
        if committed and not reckpt.verify(path).ok:
            return False
    return True


LOCAL_FAULTS = [
    (op, error, times)
    for op in ("mkdir", "write", "append", "rename", "fsync", "delete")
    for error, times in (("ENOSPC", None), ("EIO", None), ("EROFS", None), ("transient", 2))
]


def storage_faults_local(workdir: str) -> dict[str, Any]:
    """A save into ``faulty://`` local disk, each operation kind failing with each error."""
    tally = _tally(recovered=0, tolerated=0, clear_errors=0, not_exercised=0, failed_operations=0)
    for i, (op, error, times) in enumerate(LOCAL_FAULTS):
        root = os.path.join(workdir, "faults", f"{i}")
        m1, o1 = model_at(1)
        reckpt.save_model(f"{root}/model.ckpt-1", m1, o1)
        inj = FaultInjector([Fault(op, error, f"{root}/*", times=times)])
        m2, o2 = model_at(2)
        tally["trials"] += 1
        err: Exception | None = None
        try:
            reckpt.save_model(f"faulty://{root}/model.ckpt-2", m2, o2, storage_options={"injector": inj})
        except Exception as e:
            err = e
        if not inj.injected:
            tally["not_exercised"] += 1
            continue
        tally["injected"] += 1
        tally["failed_operations"] += len(inj.injected)
        case = f"{op}/{error}"
        if err is None:
            if times is None and op != "delete":  # a save deletes only after its commit
                tally["failures"].append(f"{case}: a persistent fault went unnoticed")
            elif _intact(root, 2):
                tally["detected"] += 1
                tally["recovered" if times else "tolerated"] += 1
            else:
                tally["failures"].append(f"{case}: the save returned but model.ckpt-2 does not verify")
        elif isinstance(err, StorageError | CheckpointError) and root in str(err):
            tally["detected"] += 1
            tally["clear_errors"] += 1
            if times:
                tally["failures"].append(f"{case}: a transient fault was not retried: {err}")
        else:
            tally["failures"].append(f"{case}: unclear error {type(err).__name__}: {err}")
        if not _intact(root, 1):
            tally["lost"] += 1
            tally["failures"].append(f"{case}: model.ckpt-1 was damaged")
        if not _nothing_half_visible(root):
            tally["failures"].append(f"{case}: a checkpoint looks committed but does not verify")
    return tally


def storage_faults_s3(upstream_port: int, bucket: str, seed: int) -> dict[str, Any]:
    """Saves through a proxy failing S3 requests: a fraction (retried) and all (clear error)."""
    tally = _tally(requests=0, recovered=0, clear_errors=0)
    root = f"s3://{bucket}/proxy-faults"
    m1, o1 = model_at(1)
    reckpt.save_model(f"{root}/model.ckpt-1", m1, o1)
    with FaultProxy(upstream_port, error_rate=0.1, drop_rate=0.05, seed=seed) as proxy:
        opts: dict[str, Any] = {"endpoint_url": proxy.endpoint}
        for step in (2, 3, 4):
            m, o = model_at(step)
            tally["trials"] += 1
            try:
                reckpt.save_model(f"{root}/model.ckpt-{step}", m, o, storage_options=opts)
                ok = _intact(root, step)
            except Exception as e:  # a fault that got through every retry
                ok = False
                tally["failures"].append(f"transient S3 faults, step {step}: {type(e).__name__}: {e}")
            tally["recovered"] += int(ok)
        tally["injected"] += proxy.errors + proxy.drops
        tally["detected"] += proxy.errors + proxy.drops if tally["recovered"] == 3 else 0
        tally["requests"] += proxy.requests
        tally["failed_requests"] = proxy.errors + proxy.drops
    with FaultProxy(upstream_port, error_rate=1.0, seed=seed) as proxy:
        opts = {
            "endpoint_url": proxy.endpoint,
            "config_kwargs": {"retries": {"max_attempts": 1}},
        }
        m, o = model_at(5)
        tally["trials"] += 1
        try:
            reckpt.save_model(f"{root}/model.ckpt-5", m, o, storage_options=opts)
            tally["failures"].append("persistent S3 faults: the save returned")
        except StorageError as e:
            tally["clear_errors"] += 1
            tally["detected"] += 1
            tally["example_error"] = str(e)
        tally["injected"] += 1  # one persistent fault, however many requests it failed
        tally["requests"] += proxy.requests
        tally["failed_requests"] += proxy.errors
    for step in (1, 2, 3, 4):
        if not _intact(root, step):
            tally["lost"] += 1
            tally["failures"].append(f"{root}/model.ckpt-{step} does not verify after the faults")
    st = storage_for(root)
    if checkpoint_state(st, f"{root}/model.ckpt-5") == "committed":
        tally["failures"].append("model.ckpt-5 looks committed after a failed save")
    return tally


def flip_bit(path: str) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x10]))


def truncate_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


class WarningRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def pristine_checkpoint(root: str, step: int) -> str:
    """A checkpoint with every kind of file: data, DCP metadata, manifest, plan, meta,
    dataloader state, an extra part, the metrics sidecar; plus the eval results line."""
    m, o = model_at(step)
    sched = torch.optim.lr_scheduler.StepLR(o, 10)
    ckpt = f"{root}/model.ckpt-{step}"
    reckpt.save_model(
        ckpt,
        m,
        o,
        extra_states={"lr_scheduler": sched},
        plan=PLAN,
        meta={"load_model": True},
        dataloader_state={"part:0": step},
    )
    st = storage_for(root)
    metrics = {"auc": 0.5 + step / 100}
    append_eval_result(st, f"{root}/{TRAIN_EVAL_RESULT_FILENAME}", step, metrics)
    write_checkpoint_metrics(st, ckpt, "eval", metrics)
    return ckpt


def corruption(workdir: str) -> dict[str, Any]:
    """Flip a bit in, and truncate, every file of a checkpoint and the results file."""
    tally = _tally(by_file={})
    pristine = os.path.join(workdir, "pristine")
    ckpt = pristine_checkpoint(pristine, 7)
    files = [os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs]
    handler = WarningRecords()
    logging.getLogger("reckpt").addHandler(handler)
    try:
        for rel in [*sorted(files), f"../{TRAIN_EVAL_RESULT_FILENAME}"]:
            for damage, fn in (("flip", flip_bit), ("truncate", truncate_half)):
                root = os.path.join(workdir, "corrupt", f"{len(tally['by_file'])}-{damage}")
                shutil.copytree(pristine, root)
                target = os.path.normpath(os.path.join(root, "model.ckpt-7", rel))
                fn(target)
                name = os.path.basename(target)
                tally["trials"] += 1
                tally["injected"] += 1
                found = detect(root, name, handler)
                tally["by_file"][f"{rel} ({damage})"] = found
                if found:
                    tally["detected"] += 1
                else:
                    tally["failures"].append(f"{rel} ({damage}): not detected, or the file not named")
    finally:
        logging.getLogger("reckpt").removeHandler(handler)
    return tally


def detect(root: str, name: str, handler: WarningRecords) -> str:
    """How a damaged file was caught (``""``: it was not); both verify and restore must name it."""
    ckpt = f"{root}/model.ckpt-7"
    if name == TRAIN_EVAL_RESULT_FILENAME:
        problems = cross_check_eval_results(storage_for(root), root)
        return "cross-check" if any(name in p for p in problems) else ""
    report = reckpt.verify(ckpt)
    if report.ok or not any(name in p for p in report.problems):
        return ""
    handler.messages.clear()
    torch.manual_seed(3)
    m, o = Tiny(), None
    o = torch.optim.Adam(m.parameters())
    try:
        reckpt.restore_model(ckpt, m, o)
    except (IntegrityError, UnsafeCheckpointError) as e:
        return "verify+restore" if name in str(e) else ""
    # Sidecars hold metrics, not weights: restore loads and warns, naming the file.
    return "verify+restore warning" if any(name in msg for msg in handler.messages) else ""


def fallback(workdir: str) -> dict[str, Any]:
    """Resume with the newest checkpoint damaged: the manager falls back to the previous one."""
    tally = _tally()
    root = os.path.join(workdir, "fallback")
    pristine_checkpoint(root, 1)
    pristine_checkpoint(root, 2)
    flip_bit(os.path.join(root, "model.ckpt-2", "model", "__0_0.distcp"))
    tally["trials"] = tally["injected"] = 1
    handler = WarningRecords()
    logging.getLogger("reckpt").addHandler(handler)
    try:
        m = Tiny()
        o = torch.optim.Adam(m.parameters())
        with reckpt.CheckpointManager(root) as mgr:
            info = mgr.restore_latest(m, o)
    finally:
        logging.getLogger("reckpt").removeHandler(handler)
    want_m, _ = model_at(1)
    ok = (
        info is not None
        and info.step == 1
        and all(
            torch.equal(a, b)
            for a, b in zip(m.state_dict().values(), want_m.state_dict().values(), strict=True)
        )
    )
    logged = any("model.ckpt-2" in msg and "__0_0.distcp" in msg for msg in handler.messages)
    tally["detected"] = int(ok and logged)
    if not (ok and logged):
        tally["failures"].append(f"fallback: restored {info and info.path}, logged={logged}")
    return tally


def _rewrite_metadata(path: str, change: Any) -> None:
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own, known-good file
    change(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def hostile(workdir: str) -> dict[str, Any]:
    """Crafted checkpoints: refused with a clear error, nothing run, read, written or allocated."""
    tally = _tally(max_rss_growth_mb=0.0)
    marker = os.path.join(workdir, "pwned")

    def storage_outside(md: Any) -> None:
        for k, info in md.storage_data.items():
            md.storage_data[k] = dataclasses.replace(info, relative_path="../../../etc/passwd")

    def storage_absolute(md: Any) -> None:
        for k, info in md.storage_data.items():
            md.storage_data[k] = dataclasses.replace(info, relative_path="/etc/passwd")

    def terabyte(md: Any) -> None:
        for k, info in md.storage_data.items():
            md.storage_data[k] = dataclasses.replace(info, length=1 << 40)

    def huge_shape(md: Any) -> None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        item = md.state_dict_metadata["emb.weight"]
        item.size = torch.Size([1 << 37, 8])  # 4 TB of float32
        item.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1 << 37, 8]))]

    def manifest_entry(path: str) -> Any:
        def edit(ckpt: str) -> None:
            p = os.path.join(ckpt, "reckpt.json")
            with open(p) as f:
                doc = json.load(f)
            doc["files"][path] = doc["files"].pop("model/.metadata")
            doc.pop("manifest_checksum")
            doc["manifest_checksum"] = _self_checksum(doc)  # a crafted file passes its own check
            with open(p, "w") as f:
                json.dump(doc, f)

        return edit

    def metadata_pickle(ckpt: str) -> None:
        with open(os.path.join(ckpt, "model", ".metadata"), "wb") as f:
            pickle.dump(_Payload(marker), f)

    def legacy(change: Any) -> Any:
        def edit(ckpt: str) -> None:
            os.remove(os.path.join(ckpt, "reckpt.json"))  # no checksums to hide behind
            _rewrite_metadata(os.path.join(ckpt, "model", ".metadata"), change)

        return edit

    cases = {
        "pickle payload in .metadata": legacy_and(metadata_pickle),
        "'../' storage entry in .metadata": legacy(storage_outside),
        "absolute storage entry in .metadata": legacy(storage_absolute),
        "'../' file entry in the manifest": manifest_entry("../../outside"),
        "absolute file entry in the manifest": manifest_entry("/etc/passwd"),
        "entry claiming a terabyte": legacy(terabyte),
        "shape claiming 4 TB": legacy(huge_shape),
    }
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, (what, edit) in enumerate(cases.items()):
        root = os.path.join(workdir, "hostile", str(i))
        ckpt = pristine_checkpoint(root, 3)
        edit(ckpt)
        outside = sorted(os.listdir(workdir))
        tally["trials"] += 1
        tally["injected"] += 1
        m = Tiny()
        try:
            reckpt.restore_model(ckpt, m, torch.optim.Adam(m.parameters()))
            tally["failures"].append(f"{what}: restored without complaint")
        except (UnsafeCheckpointError, IntegrityError, ShapeMismatchError) as e:
            tally["detected"] += 1
            tally.setdefault("errors", {})[what] = str(e).replace(root, "<root>")
        if os.path.exists(marker) or sorted(os.listdir(workdir)) != outside:
            tally["failures"].append(f"{what}: something ran or was written outside the checkpoint")
    tally["max_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    if tally["max_rss_growth_mb"] > 512:
        tally["failures"].append(f"peak memory grew by {tally['max_rss_growth_mb']} MB")
    return tally


def legacy_and(edit: Any) -> Any:
    """``edit`` applied to the checkpoint once its manifest is gone (a legacy checkpoint)."""

    def both(ckpt: str) -> None:
        os.remove(os.path.join(ckpt, "reckpt.json"))
        edit(ckpt)

    return both
