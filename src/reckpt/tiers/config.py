"""Checkpoint tiers as configuration (pure: no I/O).

A run may keep its checkpoints on several *tiers*, fastest first: shared memory that outlives
the training process (``/dev/shm``), a node-local disk, a durable store (``s3://...`` or a
folder every node shares). Each tier is an ordinary reckpt model_dir with a cadence and a
retention of its own:

==========  ========================  ===========  ====  =========
tier        url                       every_steps  keep  keep_best
==========  ========================  ===========  ====  =========
``memory``  ``/dev/shm/reckpt/run``   50           1     no
``local``   ``/nvme/reckpt/run``      500          2     no
``durable`` ``s3://bucket/run``       2000         10    yes
==========  ========================  ===========  ====  =========

A save goes to the fastest tier due at its step (:meth:`TierSet.route`); the slower tiers due
at the same step get a copy later, from a persister process (:mod:`reckpt.tiers.persister`).
A tier is *node-scoped* when each node has its own (a local path, by default) and *shared*
when every node sees the same one (a remote URL, by default; a shared folder says so with
``shared=True``).

Example:
    >>> tiers = TierSet([Tier("memory", "/dev/shm/run", 50, keep=1),
    ...                  Tier("local", "/nvme/run", 500, keep=2),
    ...                  Tier("durable", "s3://bucket/run", 2000, keep=10, keep_best=True)])
    >>> r = tiers.route(1000)
    >>> r.save.name, [t.name for t in r.promote]
    ('memory', ['local'])
    >>> [t.name for t in tiers.route(70).promote], tiers.trigger_steps
    ([], 50)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reckpt.errors import ConfigError
from reckpt.naming import checkpoint_name

__all__ = ["Tier", "TierSet", "Route", "CONTROL_DIR"]

CONTROL_DIR = ".reckpt-tiers"
"""The persister's folder inside the fastest tier's root (requests, lock, log)."""

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_LOCAL_SCHEMES = ("", "file")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


@dataclass(frozen=True)
class Tier:
    """One place a run keeps checkpoints, with its cadence and retention.

    Args:
        name: the tier's name, unique in the run (``memory``, ``local``, ``durable`` ...).
        url: the tier's root, a model_dir of its own (local path or fsspec URL).
        every_steps: the tier is due at steps divisible by this.
        keep: newest checkpoints to keep on the tier (0: keep all).
        keep_best: also keep the best checkpoint by the eval metrics recorded in this
            tier's root (useful on the tier that is the manager's ``model_dir``).
        shared: whether every node sees the same tier (default: ``True`` for remote URLs,
            ``False`` for local paths; a folder shared by every node passes ``True``).
        storage_options: fsspec options for ``url``.
    """

    name: str
    url: str
    every_steps: int
    keep: int = 0
    keep_best: bool = False
    shared: bool | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"tier name {self.name!r} must match {_NAME_RE.pattern}")
        if not isinstance(self.url, str) or not self.url.strip("/"):
            raise ConfigError(f"tier {self.name!r}: url must be a non-empty path or URL, got {self.url!r}")
        if _scheme(self.url) == "memory":
            raise ConfigError(
                f"tier {self.name!r}: memory:// lives inside one process and the persister is another;"
                " use a folder under /dev/shm for a memory tier"
            )
        if (
            isinstance(self.every_steps, bool)
            or not isinstance(self.every_steps, int)
            or self.every_steps < 1
        ):
            raise ConfigError(
                f"tier {self.name!r}: every_steps must be an int >= 1, got {self.every_steps!r}"
            )
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(
                f"tier {self.name!r}: keep must be an int >= 0 (0: keep all), got {self.keep!r}"
            )
        object.__setattr__(self, "url", self.url.rstrip("/") or self.url)
        object.__setattr__(self, "storage_options", dict(self.storage_options))

    @property
    def is_local(self) -> bool:
        """Whether the tier is a POSIX path of this machine (plain or ``file://``)."""
        return _scheme(self.url) in _LOCAL_SCHEMES

    @property
    def is_shared(self) -> bool:
        """Whether every node sees the same tier (see ``shared``)."""
        return (not self.is_local) if self.shared is None else bool(self.shared)

    def checkpoint_dir(self, step: int) -> str:
        """``<url>/model.ckpt-<step>``."""
        return f"{self.url}/{checkpoint_name(step)}"

    def local_path(self) -> str:
        """The tier's root as a plain path (local tiers only)."""
        if not self.is_local:
            raise ConfigError(f"tier {self.name!r} ({self.url}) is not a local path")
        return self.url.removeprefix("file://")

    def to_json(self) -> dict[str, Any]:
        """The tier as a JSON object (what the persister process is given)."""
        return {
            "name": self.name,
            "url": self.url,
            "every_steps": self.every_steps,
            "keep": self.keep,
            "keep_best": self.keep_best,
            "shared": self.shared,
            "storage_options": dict(self.storage_options),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Tier:
        return cls(
            str(doc["name"]),
            str(doc["url"]),
            int(doc["every_steps"]),
            int(doc.get("keep", 0)),
            bool(doc.get("keep_best", False)),
            None if doc.get("shared") is None else bool(doc["shared"]),
            dict(doc.get("storage_options") or {}),
        )


@dataclass(frozen=True)
class Route:
    """Where one save goes: the tier written now, and the slower tiers that get a copy."""

    save: Tier
    promote: tuple[Tier, ...]


class TierSet:
    """An ordered list of tiers, fastest first (see the module table).

    Args:
        tiers: the tiers, fastest first.

    Raises:
        ConfigError: no tier, a repeated name or url, or (with more than one tier) a fastest
            tier that is not a local, node-scoped folder (it holds the persister's folder).
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = tuple(tiers)
        if not self.tiers:
            raise ConfigError("tiers: give at least one Tier")
        for kind, values in (("name", [t.name for t in self.tiers]), ("url", [t.url for t in self.tiers])):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"tiers: each tier needs its own {kind}; repeated: {repeated}")
        first = self.tiers[0]
        if len(self.tiers) > 1 and (not first.is_local or first.is_shared):
            raise ConfigError(
                f"tiers: the fastest tier {first.name!r} ({first.url}) must be a node-local folder"
                " (e.g. under /dev/shm): the persister that copies to the slower tiers keeps its queue there"
            )

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __getitem__(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ConfigError(f"no tier named {name!r}; the tiers are {[t.name for t in self.tiers]}")

    def index(self, name: str) -> int:
        """Position of a tier, 0 for the fastest."""
        return self.tiers.index(self[name])

    @property
    def fastest(self) -> Tier:
        return self.tiers[0]

    @property
    def trigger_steps(self) -> int:
        """The save cadence that reaches every tier's steps: the gcd of their ``every_steps``."""
        return math.gcd(*(t.every_steps for t in self.tiers))

    @property
    def control_dir(self) -> str:
        """The persister's folder: ``<fastest tier>/.reckpt-tiers`` (a plain path)."""
        return f"{self.fastest.local_path()}/{CONTROL_DIR}"

    def due(self, step: int) -> tuple[Tier, ...]:
        """The tiers whose cadence includes ``step``, fastest first."""
        return tuple(t for t in self.tiers if step % t.every_steps == 0)

    def route(self, step: int, promote_all: bool = False) -> Route:
        """Where a save of ``step`` goes: the fastest due tier, copied to the slower due ones.

        A step no tier is due at (an explicit save) goes to the fastest tier alone;
        ``promote_all`` (the final save of a run) copies it to every slower tier.
        """
        due = self.due(step)
        save = due[0] if due else self.fastest
        wanted = self.tiers if promote_all else due
        after = self.tiers.index(save)
        return Route(save, tuple(t for t in wanted if self.tiers.index(t) > after))

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tiers]

    @classmethod
    def from_json(cls, docs: Sequence[Mapping[str, Any]]) -> TierSet:
        return cls([Tier.from_json(d) for d in docs])
