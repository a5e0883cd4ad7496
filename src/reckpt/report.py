"""The load report returned by :func:`reckpt.restore_model` (one per restore)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport", "PartReport", "ShapeMismatch", "format_shape"]


@dataclass(frozen=True, slots=True)
class ShapeMismatch:
    """A key whose checkpoint shape differs from the current tensor's shape.

    Attributes:
        key: the current key.
        checkpoint_key: the checkpoint key it was matched to.
        saved: the checkpoint's shape (``None`` for a non-tensor item).
        current: the current shape (``None`` for a non-tensor value or unknown).
        block: the block that was loaded, every dimension from 0 to this size (the smaller
            of the two shapes); the rest of the current tensor kept its values. ``None`` when
            nothing was loaded. For row-wise optimizer state of a column-sharded table the
            block is the rows loaded into each column shard's part.
    """

    key: str
    checkpoint_key: str
    saved: tuple[int, ...] | None
    current: tuple[int, ...] | None
    block: tuple[int, ...] | None = None

    def describe(self) -> str:
        """One line: ``key <- checkpoint_key: saved [..], current [..], loaded [0:a, 0:b]``."""
        src = "" if self.checkpoint_key == self.key else f" <- {self.checkpoint_key}"
        what = "nothing" if self.block is None else "[" + ", ".join(f"0:{n}" for n in self.block) + "]"
        return (
            f"{self.key}{src}: saved {format_shape(self.saved)}, current {format_shape(self.current)},"
            f" loaded {what}"
        )


def format_shape(shape: tuple[int, ...] | None) -> str:
    """``[2, 4]``, or ``(non-tensor)`` for ``None``."""
    return "(non-tensor)" if shape is None else str(list(shape))


@dataclass(slots=True)
class PartReport:
    """What happened to the keys of one part (``model``, ``optimizer``, an extra state).

    Attributes:
        loaded: current keys filled from the checkpoint.
        missing: current keys absent from the checkpoint (kept their current value).
        unused: checkpoint keys no current key asked for.
        remapped: current key -> checkpoint key, where the two differ.
        shape_mismatched: keys whose shapes differ (resized or re-initialised, see below).
        resized: keys whose shape changed (same number of dimensions) and whose overlapping
            block was loaded, the rest keeping its current values; ``shape_mismatched``
            holds both shapes and the block.
        reinitialized: keys that could not be loaded and keep freshly initialised values
            (optimizer state whose shape depends on a changed sharding plan, optimizer state of
            parameters the checkpoint does not know).
        not_applied: keys read from the checkpoint that could not be put into an object
            without ``load_state_dict`` (non-tensor values; tensors are copied in place), so
            the object kept its own value.
        skipped: why the whole part was skipped (``meta`` flag, missing directory), or ``None``.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    shape_mismatched: list[ShapeMismatch] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def overlaps(self) -> list[ShapeMismatch]:
        """The resized keys' mismatches (both shapes and the block loaded), by key."""
        resized = set(self.resized)
        return sorted((m for m in self.shape_mismatched if m.key in resized), key=lambda m: m.key)


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
            for m in p.overlaps:
                lines.append(f"    resized: {m.describe()}")
            for key in p.reinitialized:
                lines.append(f"    reinitialized: {key}")
            for key in p.not_applied:
                lines.append(f"    not applied: {key}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
