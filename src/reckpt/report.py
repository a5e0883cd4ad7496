"""The load report returned by :func:`reckpt.restore_model` (one per restore)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport", "PartReport", "ShapeMismatch"]


@dataclass(frozen=True, slots=True)
class ShapeMismatch:
    """A key whose checkpoint shape differs from the current tensor's shape."""

    key: str
    checkpoint_key: str
    saved: tuple[int, ...] | None
    current: tuple[int, ...] | None


@dataclass(slots=True)
class PartReport:
    """What happened to the keys of one part (``model``, ``optimizer``, an extra state).

    Attributes:
        loaded: current keys filled from the checkpoint.
        missing: current keys absent from the checkpoint (kept their current value).
        unused: checkpoint keys no current key asked for.
        remapped: current key -> checkpoint key, where the two differ.
        shape_mismatched: keys whose shapes differ (resized or re-initialised, see below).
        resized: keys whose overlapping rows were loaded (row count changed, opted in).
        reinitialized: keys that could not be loaded and keep freshly initialised values
            (optimizer state whose shape depends on a changed sharding plan, optimizer state of
            parameters the checkpoint does not know).
        skipped: why the whole part was skipped (``meta`` flag, missing directory), or ``None``.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    shape_mismatched: list[ShapeMismatch] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass(slots=True)
class LoadReport:
    """Outcome of one restore, part by part.

    Attributes:
        checkpoint: the checkpoint directory restored from.
        parts: part name (``"model"``, ``"optimizer"``, ``"dense_ema"``, extra names) -> report.
        verified: whether file checksums were checked against the manifest before loading.
        legacy: whether the checkpoint has no reckpt manifest (a TorchEasyRec checkpoint).
        notes: human-readable remarks (warnings that were also logged).

    Example:
        >>> r = LoadReport(checkpoint="run/model.ckpt-9")
        >>> r.part("model").missing.append("extra.weight")
        >>> r.missing_keys
        ['extra.weight']
    """

    checkpoint: str
    parts: dict[str, PartReport] = field(default_factory=dict)
    verified: bool = False
    legacy: bool = False
    notes: list[str] = field(default_factory=list)

    def part(self, name: str) -> PartReport:
        """The report of one part, created empty on first use."""
        return self.parts.setdefault(name, PartReport())

    @property
    def missing_keys(self) -> list[str]:
        """Model keys missing from the checkpoint (TorchEasyRec's ``skipped_keys``)."""
        return list(self.parts["model"].missing) if "model" in self.parts else []

    def summary(self) -> str:
        """A few human-readable lines, one per part."""
        lines = [f"restored {self.checkpoint} (verified={self.verified}, legacy={self.legacy})"]
        for name, p in self.parts.items():
            if p.skipped:
                lines.append(f"  {name}: skipped ({p.skipped})")
                continue
            lines.append(
                f"  {name}: loaded={len(p.loaded)} missing={len(p.missing)} unused={len(p.unused)}"
                f" remapped={len(p.remapped)} resized={len(p.resized)}"
                f" reinitialized={len(p.reinitialized)}"
            )
            for key in p.missing:
                lines.append(f"    missing: {key}")
            for cur, old in p.remapped.items():
                lines.append(f"    remapped: {cur} <- {old}")
            for key in p.reinitialized:
                lines.append(f"    reinitialized: {key}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
