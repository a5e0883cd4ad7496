"""Peak resident memory of the trainer's Parquet reader over one pass.

``python scripts/reader_rss.py ROWS [ROWS ...]`` writes demo data of ``ROWS`` rows (the demo has
200,000) to a temporary folder, then, in a fresh child process per size, streams every batch of
one pass on one process and prints how far the peak resident set (``VmHWM``) rose above the
resident set before the reader started. A flat figure across sizes means memory is bounded by
the row group and the batch, not by the data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(data_dir: str) -> str:
    """Stream one pass of ``data_dir``'s training files; one line with the peak RSS growth."""
    # The libraries a training process has loaded anyway come before the baseline.
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import torchrec  # noqa: F401

    from reckpt.trainer.config import DataConfig
    from reckpt.trainer.data import ParquetReader, input_files

    cfg = DataConfig(
        train_input_path=os.path.join(data_dir, "train"),
        eval_input_path=os.path.join(data_dir, "eval"),
        label="label",
        dense_columns=["d0", "d1", "d2", "d3"],
        sparse_columns=["s0", "s1", "s2"],
        sequence_columns=["h0"],
        batch_size=256,
    )
    files = input_files(cfg.train_input_path, "train")
    rows = {c: 2000 for c in [*cfg.sparse_columns, *cfg.sequence_columns]}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    reader = ParquetReader(files, cfg, 0, 1, rows)
    started, batches = time.perf_counter(), 0
    for _ in reader.batches(reader.plan(None)):
        batches += 1
    peak = _status("VmHWM")
    return (
        f"{batches * cfg.batch_size:>10,} rows ({batches} batches): peak RSS +{(peak - base) / 1024:.1f} MiB"
        f" over {base / 1024:.1f} MiB, {time.perf_counter() - started:.1f} s"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--measure"]:
        print(measure(argv[1]))
        return
    from reckpt.trainer.data import make_data

    with tempfile.TemporaryDirectory(prefix="reckpt-reader-rss-") as tmp:
        for n in [int(a) for a in argv] or [200_000, 2_000_000]:
            out = os.path.join(tmp, f"d{n}")
            make_data(out, rows=n, eval_rows=1000)
            subprocess.run([sys.executable, __file__, "--measure", out], check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
