"""Key resolution for partial and remapped loads (pure: no I/O, no torch.distributed).

A restore asks, for every key of the current state dict, which checkpoint key fills
it. The answer comes from, in order: the parameter-map file (explicit renames), the
identity, then pluggable rename rules tried only for keys the checkpoint lacks (the
legacy ``ec_list`` -> ``ec_dict`` rule, TorchEasyRec's ``INPUT_TILE`` twins, the
index-keyed optimizer layout; a rename may be finished by a later rule). Shapes are then
compared: a key whose shape changed with the same number of dimensions loads the block
both shapes share, as TorchEasyRec does, unless the caller asks for strict shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from reckpt.errors import ParamMapError
from reckpt.report import PartReport, ShapeMismatch

__all__ = [
    "RenameRule",
    "Resolution",
    "parse_param_map",
    "resolve_keys",
    "overlap_block",
    "ec_list_to_ec_dict_rule",
    "input_tile_rule",
    "remap_input_tile_user_key",
    "index_keyed_optimizer_rule",
]

Shape = tuple[int, ...]
SKIP = "-"
"""Parameter-map checkpoint name meaning: keep this key's initial value."""
RenameRule = Callable[[str, Collection[str]], str | None]
"""``rule(current_key, checkpoint_keys) -> checkpoint key or None``."""


def parse_param_map(text: str, source: str) -> dict[str, str]:
    """Parse a parameter-map file: one ``current_name<whitespace>checkpoint_name`` per line.

    Blank lines and lines starting with ``#`` are ignored (TorchEasyRec rejects blank lines;
    reckpt accepts them deliberately). A checkpoint name of ``-`` means "do not restore this
    key": it keeps its initial value (e.g. a layer whose input size changed with an added table).

    Args:
        text: the file's content.
        source: the file's path, for error messages.

    Raises:
        ParamMapError: a line does not hold exactly two names, or a current name repeats.

    Example:
        >>> parse_param_map("a.weight  old.weight\\n", "map.txt")
        {'a.weight': 'old.weight'}
    """
    mapping: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        if len(tokens) != 2:
            raise ParamMapError(
                f"{source}:{lineno}: expected 'current_name checkpoint_name' (two names separated"
                f" by whitespace), got {len(tokens)} token(s): {raw.strip()!r}"
            )
        cur, old = tokens
        if cur in mapping:
            raise ParamMapError(
                f"{source}:{lineno}: {cur!r} is mapped twice (to {mapping[cur]!r} and {old!r});"
                " keep one line per current name"
            )
        mapping[cur] = old
    return mapping


@dataclass(slots=True)
class Resolution(PartReport):
    """A part's report plus ``loads``: which checkpoint key fills each loaded current key."""

    loads: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[ShapeMismatch]:
        """Mismatches that were neither resized nor re-initialised."""
        handled = set(self.resized) | set(self.reinitialized)
        return [m for m in self.shape_mismatched if m.key not in handled]


def overlap_block(saved: Shape | None, current: Shape | None) -> Shape | None:
    """The block two shapes share (per dimension, the smaller size); ``None`` if ranks differ.

    This is what a resized key loads: every dimension from 0 to the smaller size, as DCP's
    chunk-overlap planning (and so TorchEasyRec) does.

    Example:
        >>> overlap_block((2, 4), (3, 6)), overlap_block((4,), (2, 2))
        ((2, 4), None)
    """
    if saved is None or current is None or len(saved) != len(current):
        return None
    return tuple(min(a, b) for a, b in zip(saved, current, strict=True))


def _row_resizable(saved: Shape | None, current: Shape | None) -> bool:
    return (
        saved is not None
        and current is not None
        and len(saved) == len(current) >= 1
        and saved[1:] == current[1:]
        and saved[0] != current[0]
    )


def _apply_rules(key: str, rules: Sequence[RenameRule], saved_keys: Collection[str]) -> str | None:
    """The first checkpoint key the rules reach from ``key``, or ``None``.

    Rules are tried in order. A rule whose candidate is not in the checkpoint hands it on to
    the rules after it, so renames compose: an ``INPUT_TILE`` twin of a legacy ``ec_list``
    key (``ec_dict_user`` -> ``ec_dict`` -> ``ec_list``) is found, as in TorchEasyRec.
    """
    for i, rule in enumerate(rules):
        candidate = rule(key, saved_keys)
        if candidate is None or candidate == key:
            continue
        if candidate in saved_keys:
            return candidate
        found = _apply_rules(candidate, rules[i + 1 :], saved_keys)
        if found is not None:
            return found
    return None


def resolve_keys(
    current: Mapping[str, Shape | None],
    saved: Mapping[str, Shape | None],
    *,
    param_map: Mapping[str, str] | None = None,
    rules: Sequence[RenameRule] = (),
    load_overlap: bool = False,
    allow_row_resize: bool = False,
    reinit_on_mismatch: bool = False,
) -> Resolution:
    """Match current keys to checkpoint keys.

    A key whose shape changed but whose number of dimensions did not is *resized* when
    ``load_overlap`` (any dimension) or ``allow_row_resize`` (the first one only) allows it:
    it loads the overlapping block (:func:`overlap_block`) and keeps its other values. Other
    mismatches are re-initialised (``reinit_on_mismatch``) or errors.

    Args:
        current: current key -> tensor shape (``None`` for a non-tensor value).
        saved: checkpoint key -> shape (``None`` for a non-tensor item).
        param_map: explicit ``current -> checkpoint`` renames (wins over everything).
        rules: rename rules tried, in order, for keys the checkpoint lacks (they compose, see
            :func:`_apply_rules`).
        load_overlap: resize keys whose shape changed in any dimension (TorchEasyRec's rule).
        allow_row_resize: resize keys whose shape changed in the first dimension only.
        reinit_on_mismatch: mark other mismatches re-initialised instead of errors (used for
            optimizer state whose shape depends on the sharding plan).

    Returns:
        The :class:`Resolution`; its ``errors`` are mismatches the caller must refuse.

    Example:
        >>> r = resolve_keys({"w": (2, 3)}, {"w": (4, 3)}, allow_row_resize=True)
        >>> r.resized, r.loads, r.shape_mismatched[0].block
        (['w'], {'w': 'w'}, (2, 3))
    """
    param_map = param_map or {}
    saved_keys = saved.keys()
    res = Resolution()
    used: set[str] = set()
    for key, shape in current.items():
        ckpt_key = param_map.get(key, key)
        if ckpt_key == SKIP:
            res.reinitialized.append(key)
            continue
        if ckpt_key not in saved_keys:
            ckpt_key = _apply_rules(ckpt_key, rules, saved_keys) or ckpt_key
        if ckpt_key not in saved_keys:
            res.missing.append(key)
            continue
        if ckpt_key != key:
            res.remapped[key] = ckpt_key
        saved_shape = saved[ckpt_key]
        if saved_shape != shape:
            block = overlap_block(saved_shape, shape)
            resize = block is not None and (
                load_overlap or (allow_row_resize and _row_resizable(saved_shape, shape))
            )
            res.shape_mismatched.append(
                ShapeMismatch(key, ckpt_key, saved_shape, shape, block if resize else None)
            )
            if resize:
                res.resized.append(key)
            else:
                if reinit_on_mismatch:
                    res.reinitialized.append(key)
                continue
        res.loads[key] = ckpt_key
        used.add(ckpt_key)
    res.unused = sorted(k for k in saved_keys if k not in used)
    res.loaded = sorted(res.loads)
    return res


_EC_LIST = {"ec_list": "ec_dict", "mc_ec_list": "mc_ec_dict"}


def ec_list_to_ec_dict_rule(saved: Mapping[str, Shape | None]) -> RenameRule:
    """TorchEasyRec's legacy ``EmbeddingCollection`` list -> dict compatibility rule.

    Old checkpoints store ``<parent>.ec_list.<idx>.…weight`` (or ``mc_ec_list``); new models
    name the same module ``<parent>.ec_dict.<dim>`` (or ``mc_ec_dict``), ``<dim>`` being the
    table's embedding dimension. Unlike TorchEasyRec, matching is on whole path segments, so
    ``grp.ec_dict.16`` never matches ``grp.ec_dict.160``.

    Args:
        saved: the checkpoint's keys and shapes (the dimension is read from them).
    """
    aliases: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    for key, shape in saved.items():
        if not key.endswith(".weight") or shape is None or len(shape) != 2:
            continue
        segs = key.split(".")
        for i in range(1, len(segs) - 1):
            if segs[i] in _EC_LIST and segs[i + 1].isdigit():
                new = (segs[i - 1], _EC_LIST[segs[i]], str(shape[1]))
                aliases[new] = (segs[i - 1], segs[i], segs[i + 1])
                break

    def rule(key: str, saved_keys: Collection[str]) -> str | None:
        segs = key.split(".")
        for i in range(len(segs) - 2):
            old = aliases.get((segs[i], segs[i + 1], segs[i + 2]))
            if old is not None:
                return ".".join([*segs[:i], *old, *segs[i + 3 :]])
        return None

    return rule


_INPUT_TILE_TWINS = (
    (".ebc_user.embedding_bags.", ".ebc.embedding_bags."),
    (".mc_ebc_user._embedding_module.", ".mc_ebc._embedding_module."),
    (".mc_ebc_user._managed_collision_collection.", ".mc_ebc._managed_collision_collection."),
    (".ec_dict_user.", ".ec_dict."),
    (".mc_ec_dict_user.", ".mc_ec_dict."),
)


def remap_input_tile_user_key(fqn: str, valid_keys: Collection[str] | None = None) -> str:
    """TorchEasyRec's ``INPUT_TILE=3`` twin mapping (``…ebc_user…`` -> ``…ebc…``).

    Returns the first candidate present in ``valid_keys`` (or the first matching pattern
    when ``valid_keys`` is ``None``); ``fqn`` unchanged when nothing matches.
    """
    for user, shared in _INPUT_TILE_TWINS:
        if user in fqn:
            candidate = fqn.replace(user, shared)  # every occurrence, as TorchEasyRec
            if valid_keys is None or candidate in valid_keys:
                return candidate
    return fqn


def input_tile_rule(key: str, saved_keys: Collection[str]) -> str | None:
    """Rename rule form of :func:`remap_input_tile_user_key`.

    Prefers a twin present in the checkpoint; otherwise returns the first matching
    pattern's twin (as TorchEasyRec does), which later rules may rename further (a legacy
    ``ec_list`` checkpoint read by an ``INPUT_TILE=3`` model).
    """
    out = remap_input_tile_user_key(key, saved_keys)
    if out == key:
        out = remap_input_tile_user_key(key)
    return out if out != key else None


def index_keyed_optimizer_rule(name_to_index: Mapping[str, int]) -> RenameRule:
    """Map name-keyed optimizer keys (``state.<fqn>.<s>``) to index-keyed ones (``state.<i>.<s>``).

    TorchEasyRec saves a plain ``torch.optim`` optimizer with its own ``state_dict()``, whose
    per-parameter state is keyed by the parameter's position; reckpt keys it by name.
    """

    # Longest names first, so "a.weight" never claims the state of "a.weight_b".
    ordered = sorted(name_to_index.items(), key=lambda kv: -len(kv[0]))

    def rule(key: str, saved_keys: Collection[str]) -> str | None:
        if not key.startswith("state."):
            return None
        rest = key[len("state.") :]
        for name, idx in ordered:
            if rest.startswith(name + "."):
                return f"state.{idx}.{rest[len(name) + 1 :]}"
        return None

    return rule
