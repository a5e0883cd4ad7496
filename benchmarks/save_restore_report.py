"""The figures of :mod:`benchmarks.save_restore`: medians, ceilings, A/B costs, memory; JSON, markdown, PNG.

Ratios are throughput ratios (``baseline seconds / reckpt seconds``: above 1, reckpt is
faster), except the A/B costs (``with / without - 1``: the share of time the checks add) and
the memory ratios. A ratio above 1.0 against a ceiling says the ceiling was not measured
right (the disk cannot be beaten by a program that does more than the raw one); such ratios
are listed under ``measurement_errors`` and marked in the markdown.
"""

from __future__ import annotations

from typing import Any

from benchmarks import ceiling
from benchmarks.common import Chart, human_bytes, median, write_results

__all__ = ["AB_PAIRS", "ab_cost", "ratio_table", "report"]

# (with the checks, without): measured back to back, their order flipped every other round
AB_PAIRS = (
    ("reckpt save", "reckpt save (no checksums)"),
    ("reckpt restore (verified)", "reckpt restore (verify=False)"),
)
CEILING_MARK = "vs the ceiling"


def ab_cost(with_checks: list[float], without: list[float]) -> float:
    """The median over rounds of ``with / without - 1`` (each round's pair ran back to back)."""
    return median([w / o - 1.0 for w, o in zip(with_checks, without, strict=False) if o > 0])


def ratio_table(
    med: dict[str, float], runs: dict[str, list[float]], extra: dict[str, float], state: int
) -> tuple[dict[str, float], dict[str, str]]:
    """The ratios, and the ratios that could not be computed with the reason.

    Args:
        med: figure -> median seconds.
        runs: figure -> seconds of every round (for the paired A/B costs).
        extra: ``hash_wait_s``, ``xxh3_serial_s`` and ``peak_extra_rss`` (worst rank).
        state: the bytes of the worst rank's share (for the memory ratio).
    """
    ratios: dict[str, float] = {}
    missing: dict[str, str] = {}
    wbest, rbest = ceiling.best(med, "raw write"), ceiling.best(med, "raw read")
    save = med.get("reckpt save")
    restore_key = "reckpt restore (verified)"

    def put(key: str, num: str | None, den: str | None) -> None:
        if num is None or den is None or num not in med or den not in med:
            absent = next((n for n in (num, den) if n is None or n not in med), None)
            missing[key] = f"not measured: {absent}"
        else:
            ratios[key] = med[num] / med[den]

    put(f"save / write ceiling [{wbest}] (target >= 0.9)", wbest, "reckpt save")
    put(f"restore verified / read ceiling [{rbest}] (target >= 0.9)", rbest, restore_key)
    put("save / DCP default (thread_count=1) (target > 1)", "DCP save (thread_count=1)", "reckpt save")
    put("save / torch.save (target > 1)", "torch.save", "reckpt save")
    put("restore verified / DCP load (TorchEasyRec) (target > 1)", "DCP load (TorchEasyRec)", restore_key)
    put("restore verified / torch.load (target > 1)", "torch.load", restore_key)
    for (a, b), key in zip(
        AB_PAIRS,
        (
            "checksum cost A/B: save with / without checksums - 1 (target <= 0.03)",
            "verify cost A/B: restore verified / verify=False - 1 (target <= 0.03)",
        ),
        strict=True,
    ):
        if a in runs and b in runs:
            ratios[key] = ab_cost(runs[a], runs[b])
        else:
            missing[key] = f"not measured: {a if a not in runs else b}"
    dcp = [k for k in med if k.startswith("DCP save")]
    if dcp and save:
        best_dcp = min(dcp, key=lambda k: med[k])
        put(f"save / best plain DCP [{best_dcp}] (target >= 0.95)", best_dcp, "reckpt save")
    put("save / raw write, 1 stream (target >= 0.8)", ceiling.write_name(1, "buffered"), "reckpt save")
    put("restore verified / raw read, 1 stream (target >= 0.8)", ceiling.read_name(1), restore_key)
    if save:
        ratios["checksum cost: hashing not hidden by I/O / save time (target <= 0.05)"] = (
            extra["hash_wait_s"] / save
        )
        ratios["checksum, if hashed serially: xxh3 time / save time"] = extra["xxh3_serial_s"] / save
    ratios["peak extra RSS during save / state (target <= 0.25)"] = extra["peak_extra_rss"] / max(1, state)
    for name in ("reckpt save (no checksums)", "reckpt save (async, copy)", "reckpt save (async, fork)"):
        put(f"{name}: throughput {CEILING_MARK} [{wbest}]", wbest, name)
    for name in ("reckpt restore (verify=False)", "reckpt restore (verify='first')"):
        put(f"{name}: throughput {CEILING_MARK} [{rbest}]", rbest, name)
    return ratios, missing


def _worst(per_rank: list[dict[str, list[float]]], key: str) -> float:
    """The worst rank's median of ``key`` (0 when no rank has it)."""
    values = [median(r[key]) for r in per_rank if r.get(key)]
    return max(values) if values else 0.0


def report(
    out: str, name: str, procs: int, prov: dict[str, Any], workload: dict[str, Any], raw: dict[str, Any]
) -> dict[str, Any]:
    """Write ``<name>.json``, ``.md`` and ``.png`` from the workers' raw figures; the document."""
    nbytes = int(raw["state_bytes"])
    runs: dict[str, list[float]] = raw["times"]
    med = {k: median(v) for k, v in runs.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    per_rank = raw["extra"]
    extra = {k: _worst(per_rank, k) for k in ("hash_wait_s", "xxh3_serial_s")}
    rss = {k: _worst(raw["rss"], k) for k in runs}
    extra["peak_extra_rss"] = rss.get("reckpt save", 0.0)
    share = max(raw["per_rank_bytes"]) if raw["per_rank_bytes"] else nbytes
    ratios, not_measured = ratio_table(med, runs, extra, share)
    errors = [k for k, v in ratios.items() if ("ceiling" in k) and v > 1.0]
    wbest, rbest = ceiling.best(med, "raw write"), ceiling.best(med, "raw read")
    async_figures = {
        k: _worst(per_rank, k)
        for k in ("async stall s (copy)", "async stall s (fork)", "fork child private bytes")
    }
    doc = {
        "provenance": prov,
        "workload": workload,
        "state_bytes": nbytes,
        "per_rank_bytes": raw["per_rank_bytes"],
        "ceiling": {
            **ceiling.describe(),
            "write": wbest,
            "read": rbest,
            "write_gb_per_s": gbps.get(wbest or "", 0.0),
            "read_gb_per_s": gbps.get(rbest or "", 0.0),
            "o_direct": raw.get("direct_io", "unknown"),
        },
        "page_cache": (
            "every read starts cold: fsync + posix_fadvise(DONTNEED) on every file, then os.sync;"
            " before each measurement os.sync and a pause of --pause seconds"
        ),
        "order": "writers and readers rotated every round; each A/B pair back to back, its order"
        " flipped every other round; A/B cost = median over rounds of with / without - 1",
        "notes": [
            "ratios are throughput ratios (baseline seconds / reckpt seconds): above 1, reckpt is faster",
            "a ratio above 1.0 against a ceiling is a measurement error, not a result",
            "safetensors load reads the whole file into memory (safetensors.torch.load): a real read",
            "peak extra RSS and hashing waits are per rank (the worst rank), against that rank's bytes",
            "async saves: CheckpointManager(async_save=True) save + wait (stall and total);"
            " a fork's child is sampled every 50 ms for its private bytes",
        ],
        "skipped": raw.get("skipped", {}),
        "memory_available_at_start": raw.get("memory_available_at_start"),
        "median_seconds": med,
        "gb_per_s": gbps,
        "ratios": ratios,
        "ratios_not_measured": not_measured,
        "measurement_errors": errors,
        "peak_extra_rss_bytes": rss,
        "peak_extra_rss_over_state": {k: v / max(1, share) for k, v in rss.items()},
        "async": async_figures,
        "extra_medians": extra,
        "runs": runs,
        "runs_per_rank": per_rank,
        "rss_per_rank": raw["rss"],
    }
    table = [(k, f"{med[k]:.3f} s, {gbps[k]:.2f} GB/s, peak extra RSS {human_bytes(rss[k])}") for k in med]
    table += [(f"{k} (skipped)", v) for k, v in doc["skipped"].items()]
    table += [
        ("write ceiling", f"{wbest}: {gbps.get(wbest or '', 0.0):.2f} GB/s"),
        ("read ceiling", f"{rbest}: {gbps.get(rbest or '', 0.0):.2f} GB/s"),
        ("O_DIRECT", str(doc["ceiling"]["o_direct"])),
        ("reckpt save: hashing not hidden by I/O", f"{extra['hash_wait_s']:.4f} s"),
        (
            "async stall (copy) / (fork)",
            f"{async_figures['async stall s (copy)']:.3f} s / {async_figures['async stall s (fork)']:.3f} s",
        ),
        (
            "fork snapshot's child: private bytes (peak sampled)",
            human_bytes(async_figures["fork child private bytes"]),
        ),
    ]
    table += [(k, f"{v:.3f}" + (" (measurement error)" if k in errors else "")) for k, v in ratios.items()]
    table += [(k, v) for k, v in not_measured.items()]
    title = f"{human_bytes(nbytes)} on {procs} process(es): cold reads, fsync'd writes"
    writes = {k: gbps[k] for k in med if "save" in k or "write" in k}
    reads = {k: gbps[k] for k in med if k not in writes}
    label = "the ceiling (fastest raw variant)"
    charts = [
        Chart(writes, "GB/s (higher is better)", "writes", target=gbps.get(wbest or ""), target_label=label),
        Chart(reads, "GB/s (higher is better)", "reads", target=gbps.get(rbest or ""), target_label=label),
    ]
    write_results(out, name, doc, table, chart=charts, chart_title=f"{name}: {title}")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}" + (" (measurement error)" if k in errors else ""))
    for k, v in not_measured.items():
        print(f"{k}: {v}")
    return doc
