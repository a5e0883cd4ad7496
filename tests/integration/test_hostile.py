"""Hostile checkpoints are refused with a clear error: nothing runs, nothing is read or written
outside the checkpoint, nothing huge is allocated."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.reliability_checks import hostile


def test_every_hostile_checkpoint_is_refused(tmp_path: Path) -> None:
    tally = hostile(str(tmp_path))
    assert tally["failures"] == []
    assert tally["trials"] == tally["detected"] == 7
    errors = tally["errors"]
    # the callable is named by its module: io.open on Python 3.11, _io.open on 3.12
    assert re.search(r"refusing to load _?io\.open\b", errors["pickle payload in .metadata"])
    for case in ("'../' storage entry in .metadata", "absolute storage entry in .metadata"):
        assert "outside the checkpoint directory; refusing to read it" in errors[case]
    assert (
        "file entry '../../outside' points outside the checkpoint"
        in errors["'../' file entry in the manifest"]
    )
    assert "file entry '/etc/passwd' points outside" in errors["absolute file entry in the manifest"]
    assert "claims bytes up to 1099511627776 of __0_0.distcp" in errors["entry claiming a terabyte"]
    # refused from the metadata alone: overlap loading would otherwise read its [64, 8] block
    assert "'emb.weight' claims a chunk of shape [137438953472, 8]" in errors["shape claiming 4 TB"]
    assert "the metadata is corrupt or crafted, refusing to read it" in errors["shape claiming 4 TB"]
    assert tally["max_rss_growth_mb"] < 512
