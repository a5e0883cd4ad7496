"""Start writing a file range to disk now, without waiting for it (Linux ``sync_file_range``).

A save ends with ``fsync``; if the kernel has held every written page back until then, the
fsync waits for all of them at once and the disk sat idle while the pages were filled. Asking
for writeback of each written piece right away overlaps the disk with the rest of the save,
so the final fsync finds little left. Where ``sync_file_range`` is unavailable (not Linux, no
libc) this does nothing; durability still comes from the fsync.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

__all__ = ["start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None
_looked_up = False


def _lookup() -> Any:
    global _sync_file_range, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                _sync_file_range = None
    return _sync_file_range


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk.

    Returns whether the request was made; a failure is not an error (the later fsync
    still makes the data durable).
    """
    fn = _lookup()
    if fn is None:
        return False
    return int(fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)) == 0
