"""The reliability report: crash injection, storage faults, corruption, hostile checkpoints.

Usage::

    python -m benchmarks.reliability --kills 200 --seed 0

writes ``benchmarks/results/reliability.json``, ``reliability.md`` and ``reliability.png``:
trials, faults injected, faults detected and checkpoints lost (which must be 0) per section,
and the kills per phase of the commit protocol. Exits non-zero when a check failed. S3 runs
against a moto server started on 127.0.0.1 for the run; ``--backends local`` skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch

from benchmarks import kill_harness as kh
from benchmarks import reliability_checks as checks
from benchmarks.common import Chart, provenance, write_charts

BUCKET = "reckpt-reliability"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], int]:
    """moto's S3 server in a child process on 127.0.0.1, with the report's bucket; env set."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            return proc, port
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)


def run_kills(kills: int, seed: int, backends: list[str], workdir: str) -> dict[str, Any]:
    scenarios = [sc for sc in kh.SCENARIOS if sc.backend in backends]
    per = math.ceil(kills / len(scenarios))
    rng = random.Random(seed)
    total = kh.Tally()
    by_scenario = {}
    for i, sc in enumerate(scenarios):
        t = kh.Tally()
        root = f"s3://{BUCKET}/kills-{i}" if sc.backend == "s3" else os.path.join(workdir, f"kills-{i}")
        start = time.monotonic()
        kh.run_scenario(sc, root, workdir, per, rng, t, first_phase=i * per)
        by_scenario[sc.name] = {
            "kills": t.kills,
            "by_phase": t.by_phase,
            "lost": t.lost,
            "foreign_lost": t.foreign_lost,
            "seconds": round(time.monotonic() - start, 1),
        }
        for key, value in asdict(t).items():
            if key == "by_phase":
                for phase, n in value.items():
                    total.by_phase[phase] += n
            elif key == "failures":
                total.failures += value
            else:
                setattr(total, key, getattr(total, key) + value)
    return {"total": asdict(total), "by_scenario": by_scenario}


def summarise(sections: dict[str, dict[str, Any]]) -> dict[str, int]:
    kills = sections["crash injection"]["total"]
    out = {
        "trials": kills["trials"],
        "faults_injected": kills["kills"],
        "faults_detected": kills["handled"],
        "checkpoints_lost": kills["lost"] + kills["looks_committed_but_not"],
        "foreign_files_lost": kills["foreign_lost"],
        "failures": len(kills["failures"]),
    }
    for name, t in sections.items():
        if name == "crash injection":
            continue
        out["trials"] += t["trials"]
        out["faults_injected"] += t["injected"]
        out["faults_detected"] += t["detected"]
        out["checkpoints_lost"] += t["lost"]
        out["failures"] += len(t["failures"])
    return out


def markdown(doc: dict[str, Any]) -> str:
    prov, s = doc["provenance"], doc["summary"]
    kills = doc["sections"]["crash injection"]["total"]
    lines = [
        "# reliability",
        "",
        f"`{prov['command']}` at {prov['git_revision']}, seed {doc['seed']}",
        "",
        "| trials | faults injected | faults detected | checkpoints lost | failed checks |",
        "|---:|---:|---:|---:|---:|",
        f"| {s['trials']} | {s['faults_injected']} | {s['faults_detected']} | {s['checkpoints_lost']}"
        f" | {s['failures']} |",
        "",
        "| section | trials | injected | detected | lost |",
        "|---|---:|---:|---:|---:|",
        f"| crash injection (SIGKILL at storage op k) | {kills['trials']} | {kills['kills']}"
        f" | {kills['handled']} | {kills['lost']} |",
    ]
    for name, t in doc["sections"].items():
        if name != "crash injection":
            lines.append(f"| {name} | {t['trials']} | {t['injected']} | {t['detected']} | {t['lost']} |")
    lines += ["", "Kills per phase of the commit protocol:", "", "| phase | kills |", "|---|---:|"]
    lines += [f"| {p} | {n} |" for p, n in kills["by_phase"].items()]
    lines += ["", "| scenario | kills | lost | seconds |", "|---|---:|---:|---:|"]
    for name, sc in doc["sections"]["crash injection"]["by_scenario"].items():
        lines.append(f"| {name} | {sc['kills']} | {sc['lost']} | {sc['seconds']} |")
    lines += [
        "",
        f"After each kill: {kills['verified']} committed checkpoints verified,"
        f" {kills['restored_bit_exact']} newest checkpoints restored bit-exact,"
        f" {kills['debris_cleaned']} pieces of debris cleaned by the next start,"
        f" {kills['debris_left']} left; {kills['foreign_checked']} checks of a user's files"
        f" (in half the targets and in the model_dir), {kills['foreign_lost']} lost.",
    ]
    return "\n".join(lines) + "\n"


def charts(doc: dict[str, Any]) -> list[Chart]:
    """The PNG's panels: trials per section, kills per phase, checkpoints lost per scenario and section."""
    crash = doc["sections"]["crash injection"]
    others = {name: t for name, t in doc["sections"].items() if name != "crash injection"}
    trials = {"crash injection": crash["total"]["trials"], **{n: t["trials"] for n, t in others.items()}}
    lost = {f"crash injection {n}": sc["lost"] for n, sc in crash["by_scenario"].items()}
    lost.update({n: t["lost"] for n, t in others.items()})
    return [
        Chart(trials, "trials", "trials per section", highlight=(), reference=()),
        Chart(
            crash["total"]["by_phase"],
            "SIGKILLs",
            "kills per phase of the commit protocol",
            highlight=(),
            reference=(),
        ),
        Chart(lost, "checkpoints lost (must be 0)", "checkpoints lost", highlight=(), reference=()),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=200, help="SIGKILLs in all, spread over the scenarios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    torch.set_num_threads(1)
    moto = None
    saved_env = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="reckpt-reliability-", dir=args.workdir) as workdir:
            sections: dict[str, Any] = {}
            port = 0
            if "s3" in backends:
                moto, port = start_moto()
            sections["crash injection"] = run_kills(args.kills, args.seed, backends, workdir)
            sections["storage faults (local, faulty://)"] = checks.storage_faults_local(workdir)
            if "s3" in backends:
                sections["storage faults (s3, failing proxy)"] = checks.storage_faults_s3(
                    port, BUCKET, args.seed
                )
            sections["corruption (flip, truncate)"] = checks.corruption(workdir)
            sections["resume fallback"] = checks.fallback(workdir)
            sections["hostile checkpoints"] = checks.hostile(workdir)
            doc = {
                "provenance": provenance(workdir),
                "seed": args.seed,
                "kills_requested": args.kills,
                "backends": backends,
                "summary": summarise(sections),
                "sections": sections,
            }
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        os.environ.clear()
        os.environ.update(saved_env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reliability.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "reliability.md"), "w") as f:
        f.write(markdown(doc) + "\n![reliability](reliability.png)\n")
    s = doc["summary"]
    title = (
        f"reliability, seed {args.seed}: {s['trials']} trials, {s['faults_injected']} faults injected,"
        f" {s['checkpoints_lost']} checkpoints lost"
    )
    write_charts(os.path.join(args.out, "reliability.png"), title, charts(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    result = main()
    s = result["summary"]
    sys.exit(1 if s["checkpoints_lost"] or s["failures"] else 0)
