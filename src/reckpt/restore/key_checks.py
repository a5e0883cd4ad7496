"""Checks that a restore does what was asked (pure: no I/O).

- Every parameter-map line is a command: its current name must be a key of the state being
  restored and its checkpoint name a key of the checkpoint. A typo on either side is an
  error listing the bad lines with the closest real names; TorchEasyRec's warn-and-skip is
  available with ``lenient_param_map=True``.
- A restore that matches none of the model's keys (another model's checkpoint) is an error
  naming a few keys on each side; one that matches fewer than half is a loud warning (a
  partial fine-tune may mean it).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Collection, Mapping

from reckpt.errors import KeyMismatchError, ParamMapError
from reckpt.remap import SKIP, Resolution

__all__ = ["resolved_keys", "check_param_map", "check_matched"]

logger = logging.getLogger(__name__)

_SHOWN = 3


def resolved_keys(res: Resolution) -> set[str]:
    """Every current key a resolution looked at."""
    return {*res.loads, *res.missing, *res.reinitialized, *(m.key for m in res.shape_mismatched)}


def _closest(name: str, keys: Collection[str]) -> str:
    near = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_param_map(
    param_map: Mapping[str, str],
    current: Collection[str],
    saved: Collection[str],
    source: str,
    *,
    lenient: bool,
) -> list[str]:
    """The map lines that name nothing; raises unless ``lenient`` (then warns once).

    Raises:
        ParamMapError: a current name is not a key being restored, or a checkpoint name is not
            in the checkpoint (every bad line is listed, with the closest real name).
    """
    bad = []
    for cur, ck in sorted(param_map.items()):
        if cur not in current:
            bad.append(f"'{cur} {ck}': the current model has no {cur!r}{_closest(cur, current)}")
        elif ck != SKIP and ck not in saved:
            bad.append(f"'{cur} {ck}': the checkpoint has no {ck!r}{_closest(ck, saved)}")
    if not bad:
        return bad
    text = f"{source}: {len(bad)} parameter-map line(s) name nothing:\n  " + "\n  ".join(bad)
    if lenient:
        logger.warning("%s\nThose lines are skipped (lenient_param_map=True).", text)
        return bad
    raise ParamMapError(
        text + "\nFix the names, or pass lenient_param_map=True to skip such lines as TorchEasyRec does."
    )


def check_matched(
    keys: Collection[str], loaded: Collection[str], saved: Collection[str], source: str
) -> None:
    """Refuse a model restore that matches no key; warn loudly below half.

    Args:
        keys: the model's keys; loaded: those found in the checkpoint; saved: the
            checkpoint's keys (a few are named in the message).

    Raises:
        KeyMismatchError: the model has keys and none of them is loaded from the checkpoint.
    """
    total, matched = len(keys), len(loaded)
    if total == 0 or 2 * matched >= total:
        return
    ours = sorted(k for k in keys if k not in loaded)[:_SHOWN]
    theirs = sorted(saved)[:_SHOWN]
    detail = f"model keys such as {ours}, checkpoint keys such as {theirs}"
    if matched == 0:
        raise KeyMismatchError(
            f"{source}: none of the model's {total} keys is in this checkpoint ({detail}). It is"
            " probably another model's checkpoint: check the path, or map the names with a"
            " parameter-map file"
        )
    logger.warning(
        "%s: only %d of the model's %d keys are in this checkpoint (%s); the rest keeps its initial"
        " values. If this is not a partial fine-tune, it is the wrong checkpoint.",
        source,
        matched,
        total,
        detail,
    )
