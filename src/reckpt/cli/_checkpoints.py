"""Checkpoint commands: ls, inspect, verify, diff, latest, best, prune, plot."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from reckpt.cli._output import emit as _emit
from reckpt.cli._output import human_size as _size
from reckpt.cli._output import progress
from reckpt.cli._selection import cmd_best, cmd_plot, cmd_prune, direction_flags
from reckpt.cli._train import flag

if TYPE_CHECKING:
    from reckpt.storage.core import Storage

__all__ = ["register"]


def _is_checkpoint(storage: Storage, path: str) -> bool:
    from reckpt.commit.state import checkpoint_state
    from reckpt.naming import parse_any_step

    return parse_any_step(path) is not None or checkpoint_state(storage, path) in ("committed", "legacy")


def cmd_ls(args: argparse.Namespace) -> int:
    from reckpt.commit.leases import active_leases
    from reckpt.errors import CheckpointNotFoundError
    from reckpt.lifecycle.discovery import best_in, checkpoints_in, latest_in
    from reckpt.storage.core import storage_for

    if len(args.model_dir) > 1:
        return _ls_tiers(args)
    args.model_dir = args.model_dir[0]
    storage = storage_for(args.model_dir)
    if not storage.isdir(args.model_dir):
        raise CheckpointNotFoundError(f"{args.model_dir}: no such model_dir")
    infos = checkpoints_in(storage, args.model_dir)
    latest, _ = latest_in(storage, args.model_dir)
    try:
        best, _ = best_in(storage, args.model_dir) if any(c.metrics for c in infos) else (None, -1)
    except ValueError:
        best = None  # several metrics and none named: `reckpt best --metric` decides
    leased = set(active_leases(storage, args.model_dir))
    rows: list[dict[str, Any]] = []
    for c in infos:
        marks = [
            m
            for m, on in (
                ("latest", c.path == latest),
                ("best", c.path == best),
                ("leased", c.step in leased),
                (f"delta(base {c.needs[0]})" if c.needs else "delta", c.kind == "delta"),
            )
            if on
        ]
        rows.append(
            {
                "step": c.step,
                "path": c.path,
                "state": c.state,
                "kind": c.kind,
                "needs": list(c.needs),
                "created_at": c.created_at,
                "size_bytes": c.size,
                "metrics": dict(c.metrics),
                "markers": marks,
            }
        )
    lines = [f"{'step':>8}  {'state':<10} {'created':<19} {'size':>9}  {'metrics':<32} markers"]
    for r in rows:
        created = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])) if r["created_at"] else "-"
        )
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items())) or "-"
        size = _size(r["size_bytes"])
        tags = ",".join(r["markers"])
        lines.append(f"{r['step']:>8}  {r['state']:<10} {created:<19} {size:>9}  {metrics:<32} {tags}")
    _emit(args, {"model_dir": args.model_dir, "checkpoints": rows}, lines if rows else ["(no checkpoints)"])
    return 0


def _ls_tiers(args: argparse.Namespace) -> int:
    """``reckpt ls A B C``: the steps of several model_dirs (a run's tiers) side by side.

    A committed checkpoint that lacks some of its manifest's files (a node's part of a
    multi-node checkpoint, docs/tiers.md) shows as ``part``.
    """
    from reckpt.format.manifest import read_manifest
    from reckpt.lifecycle.discovery import checkpoints_in
    from reckpt.storage.core import storage_for

    dirs = list(args.model_dir)
    table: dict[int, dict[str, str]] = {}
    for model_dir in dirs:
        storage = storage_for(model_dir)
        for c in checkpoints_in(storage, model_dir, with_size=False):
            state = c.state
            if state == "committed":
                manifest = read_manifest(storage, c.path, check=False)
                if manifest is not None and not set(manifest.files) <= set(storage.walk_files(c.path)):
                    state = "part"
            table.setdefault(c.step, {})[model_dir] = state
    width = max(12, *(len(d) for d in dirs))
    lines = [f"{'step':>8}  " + "  ".join(f"{d:<{width}}" for d in dirs)]
    for step in sorted(table, reverse=True):
        lines.append(f"{step:>8}  " + "  ".join(f"{table[step].get(d, '-'):<{width}}" for d in dirs))
    rows = [{"step": step, "copies": table[step]} for step in sorted(table, reverse=True)]
    _emit(args, {"model_dirs": dirs, "steps": rows}, lines if rows else ["(no checkpoints)"])
    return 0


def _sharding(checkpoint: str) -> dict[str, str]:
    """Model key -> sharding type, from the checkpoint's plan file (TorchEasyRec schema)."""
    from reckpt.sharding.plan import read_plan

    out: dict[str, str] = {}
    for module, tables in (read_plan(checkpoint) or {}).items():
        for table, ps in tables.items():
            out[f"{module}.embedding_bags.{table}.weight"] = ps.get("sharding_type", "")
            out[f"{module}.embeddings.{table}.weight"] = ps.get("sharding_type", "")
    return out


def _delta_link(checkpoint: str) -> dict[str, Any] | None:
    """A delta checkpoint's link record (base, chain, rows per table), else ``None``."""
    from reckpt.format.manifest import read_manifest
    from reckpt.storage.core import storage_for

    manifest = read_manifest(storage_for(checkpoint), checkpoint.rstrip("/"))
    return None if manifest is None else manifest.delta


def cmd_inspect(args: argparse.Namespace) -> int:
    from reckpt.restore.inspection import inspect_checkpoint

    contents = inspect_checkpoint(args.checkpoint)
    sharding = _sharding(args.checkpoint)
    doc: dict[str, Any] = {"checkpoint": args.checkpoint, "total_bytes": contents.total_bytes(), "parts": {}}
    lines = []
    order = sorted(contents.parts, key=lambda p: (p != "model", p != "optimizer", p))
    for part in order:
        entries = contents.parts[part]
        doc["parts"][part] = [
            {
                "name": e.name,
                "shape": e.shape,
                "dtype": e.dtype,
                "bytes": e.bytes,
                "sharding": sharding.get(e.name),
            }
            for e in entries
        ]
        lines.append(f"[{part}] {len(entries)} entries, {_size(sum(e.bytes for e in entries))}")
        for e in entries:
            shape = "x".join(map(str, e.shape)) if e.shape is not None else "(object)"
            shard = f"  {sharding[e.name]}" if e.name in sharding else ""
            lines.append(f"  {e.name:<60} {shape:<14} {e.dtype or '-':<9} {_size(e.bytes):>9}{shard}")
    link = _delta_link(args.checkpoint)
    if link is not None:
        doc["delta"] = link
        lines.append(f"[delta] chain {' -> '.join(link['chain'])} -> this ({link['encoding']})")
        lines += [f"  {key:<60} {n} rows" for key, n in sorted(link.get("rows", {}).items())]
    _emit(args, doc, lines)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reckpt.format.damage import clear_damaged, mark_damaged
    from reckpt.format.verification import verify
    from reckpt.lifecycle.discovery import checkpoints_in
    from reckpt.storage.core import storage_for

    storage = storage_for(args.path)  # the checkpoints verified are inside it
    one = _is_checkpoint(storage, args.path)
    paths = [args.path] if one else [c.path for c in checkpoints_in(storage, args.path, with_size=False)]
    if not paths:
        from reckpt.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"{args.path}: no checkpoints to verify")
    results, lines = [], []
    for path in progress(paths, "verify"):
        r = verify(path)
        if r.problems and r.state in ("committed", "legacy"):  # known-bad from now on (reckpt.format.damage)
            mark_damaged(storage, path, r.problems)
        elif r.ok:
            clear_damaged(storage, path)
        results.append(
            {
                "checkpoint": path,
                "state": r.state,
                "ok": r.ok,
                "files_checked": r.checked,
                "problems": r.problems,
                "unexpected": r.unexpected,
            }
        )
        lines.append(f"{'OK  ' if r.ok else 'FAIL'} {path} ({r.state}, {r.checked} files)")
        lines.extend(f"     {p}" for p in r.problems)
    doc: dict[str, Any] = {"results": results, "ok": all(r["ok"] for r in results)}
    if not one:
        # The results file is appended to and carries no checksum: cross-check it instead.
        from reckpt.format.eval_results import cross_check_eval_results

        eval_problems = cross_check_eval_results(storage, args.path)
        doc["eval_results"] = {"ok": not eval_problems, "problems": eval_problems}
        doc["ok"] = doc["ok"] and not eval_problems
        mark = "OK  " if not eval_problems else "FAIL"
        lines.append(f"{mark} eval results (cross-checked with the metrics sidecars)")
        lines.extend(f"     {p}" for p in eval_problems)
    _emit(args, doc, lines)
    return 0 if doc["ok"] else 1


def cmd_latest(args: argparse.Namespace) -> int:
    from reckpt.errors import CheckpointNotFoundError
    from reckpt.lifecycle.discovery import latest_checkpoint

    path, step = latest_checkpoint(args.model_dir)
    if path is None:
        raise CheckpointNotFoundError(f"{args.model_dir}: no committed checkpoint")
    _emit(args, {"path": path, "step": step}, [path])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import torch

    from reckpt.restore.inspection import inspect_checkpoint, read_part

    a, b = inspect_checkpoint(args.a), inspect_checkpoint(args.b)
    doc: dict[str, Any] = {
        "a": args.a,
        "b": args.b,
        "added": [],
        "removed": [],
        "reshaped": [],
        "changed": [],
    }
    pairs = []
    for part in sorted(set(a.parts) | set(b.parts)):
        ea = {e.name: e for e in a.parts.get(part, [])}
        eb = {e.name: e for e in b.parts.get(part, [])}
        doc["added"] += [f"{part}/{k}" for k in sorted(set(eb) - set(ea))]
        doc["removed"] += [f"{part}/{k}" for k in sorted(set(ea) - set(eb))]
        for k in sorted(set(ea) & set(eb)):
            if ea[k].shape != eb[k].shape or ea[k].dtype != eb[k].dtype:
                doc["reshaped"].append(
                    {"name": f"{part}/{k}", "a": [ea[k].shape, ea[k].dtype], "b": [eb[k].shape, eb[k].dtype]}
                )
            elif ea[k].shape is not None:
                pairs.append((part, k))
    if args.verify:  # once per checkpoint; the per-tensor reads below then skip it
        from reckpt.cli._convert import verified

        verified(args.a, "compare")
        verified(args.b, "compare")
    for part, k in progress(pairs, "diff"):
        ta = read_part(args.a, part, [k], verify=False)[k].double()
        tb = read_part(args.b, part, [k], verify=False)[k].double()
        delta = (ta - tb).abs()
        max_abs = float(delta.max()) if delta.numel() else 0.0
        max_rel = float((delta / ta.abs().clamp_min(1e-12)).max()) if delta.numel() else 0.0
        doc["changed"].append(
            {
                "name": f"{part}/{k}",
                "max_abs": max_abs,
                "max_rel": max_rel,
                "equal": bool(torch.equal(ta, tb)),
            }
        )
    lines = [f"+ {k}" for k in doc["added"]] + [f"- {k}" for k in doc["removed"]]
    lines += [f"~ {r['name']}: {r['a']} -> {r['b']}" for r in doc["reshaped"]]
    lines += [
        f"  {r['name']:<64} max_abs={r['max_abs']:.3g} max_rel={r['max_rel']:.3g}"
        for r in doc["changed"]
        if not r["equal"]
    ]
    same = sum(r["equal"] for r in doc["changed"])
    lines.append(
        f"{len(doc['added'])} added, {len(doc['removed'])} removed, {len(doc['reshaped'])} reshaped,"
        f" {len(doc['changed']) - same} changed, {same} identical"
    )
    _emit(args, doc, lines)
    return 0


def register(sub: Any) -> None:
    def add(name: str, func: Any, help: str, example: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, epilog=f"example: {example}"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output (docs/cli.md)")
        p.set_defaults(func=func)
        return p

    p = add(
        "ls",
        cmd_ls,
        "list checkpoints: step, state, created, size, metrics, markers; several model_dirs (a run's"
        " tiers): each step's state in each, side by side",
        "reckpt ls /dev/shm/run /nvme/run s3://bucket/run",
    )
    p.add_argument("model_dir", nargs="+")
    p = add(
        "inspect",
        cmd_inspect,
        "entries of a checkpoint (name, shape, dtype, bytes, sharding)",
        "reckpt inspect runs/a/model.ckpt-500",
    )
    p.add_argument("checkpoint")
    p = add(
        "verify",
        cmd_verify,
        "check sizes and checksums of a checkpoint or of every checkpoint in a model_dir",
        "reckpt verify runs/a",
    )
    p.add_argument("path")
    p = add("latest", cmd_latest, "the newest committed checkpoint", "reckpt latest runs/a")
    p.add_argument("model_dir")
    p = add(
        "best",
        cmd_best,
        "the committed checkpoint with the best eval metric",
        "reckpt best runs/a --metric auc",
    )
    p.add_argument("model_dir")
    p.add_argument("--metric", default=None, help="metric name (default: the only one, else auc)")
    direction_flags(p)
    flag(p, "eval-result-filename", default="train_eval_result_v2.txt")
    p = add(
        "diff",
        cmd_diff,
        "added, removed, reshaped entries and per-tensor changes between two checkpoints",
        "reckpt diff runs/a/model.ckpt-500 runs/a/model.ckpt-1000",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking both checkpoints' sizes and checksums first (salvage only)",
    )
    p = add(
        "prune",
        cmd_prune,
        "delete checkpoints no policy keeps (newest, best and leased ones are never deleted)",
        "reckpt prune runs/a --keep-last 2 --keep-best auc --dry-run",
    )
    p.add_argument("model_dir")
    flag(p, "keep-last", type=int, default=0)
    flag(p, "keep-best", action="append", metavar="METRIC")
    flag(p, "keep-best-n", type=int, default=1)
    flag(p, "keep-every-steps", type=int, default=0)
    p.add_argument(
        "--metric",
        default=None,
        help="the metric that tells the best checkpoint, which is never deleted"
        " (default: the only one recorded, else auc)",
    )
    direction_flags(p)
    flag(p, "eval-result-filename", default="train_eval_result_v2.txt")
    flag(p, "dry-run", action="store_true")
    p = add(
        "plot",
        cmd_plot,
        "eval metrics against step, checkpoints marked, the best highlighted",
        "reckpt plot runs/a -o metrics.png",
    )
    p.add_argument("model_dir")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--metric", default=None)
    direction_flags(p)
    flag(p, "eval-result-filename", default="train_eval_result_v2.txt")
