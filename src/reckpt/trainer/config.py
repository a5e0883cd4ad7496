"""Trainer configuration: a TOML file validated on load (unknown keys are errors).

Field names follow TorchEasyRec where it has them (``model_dir``, ``train_config.num_steps``,
``save_checkpoints_steps``, ``keep_checkpoint_max``, ``fine_tune_checkpoint``,
``export_config.exporter_type`` ...). Example: ``examples/demo.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from reckpt.errors import ConfigError
from reckpt.tiers.config import Tier

__all__ = [
    "Config",
    "DataConfig",
    "DynamicTableConfig",
    "TierConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "ExportConfig",
    "load_config",
]


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Parquet inputs and their schema."""

    train_input_path: str = ""
    """A Parquet file, or a directory of ``*.parquet`` files."""
    eval_input_path: str = ""
    label: str = "label"
    dense_columns: list[str] = field(default_factory=list)
    sparse_columns: list[str] = field(default_factory=list)
    """int64 or list<int64> (multi-valued) id columns; one embedding-bag table each."""
    sequence_columns: list[str] = field(default_factory=list)
    """list<int64> id columns read as sequences (a user's history of ids, say): one table each
    in a TorchRec ``EmbeddingCollection``, every id looked up, the rows mean-pooled per example."""
    batch_size: int = 256


@dataclass(kw_only=True, slots=True)
class DynamicTableConfig:
    """A sparse column served by a dynamic table (:class:`reckpt.dynamic.DynamicEmbedding`)."""

    capacity: int = 0
    """Most rows per process (0: unbounded); beyond it the rows of lowest score are evicted."""
    eviction: str = "lru"
    """Eviction score: ``"lru"`` (last step seen) or ``"lfu"`` (times seen)."""
    admit_threshold: int = 0
    """Times an id must be seen before it gets a row (0 or 1: at once)."""
    learning_rate: float = 0.0
    """Row-wise Adagrad learning rate (0: ``train_config.sparse_learning_rate``)."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """DLRM shape."""

    embedding_dim: int = 16
    num_embeddings: int = 10000
    """Rows per table; ids are taken modulo this."""
    table_sizes: dict[str, int] = field(default_factory=dict)
    """Per-feature row counts overriding ``num_embeddings`` (sparse and sequence columns)."""
    dynamic_tables: dict[str, DynamicTableConfig] = field(default_factory=dict)
    """Sparse columns whose ids are raw keys of a dynamic table (rows created on first sight,
    sharded by ``id % world_size``, saved in ``dynamicemb/``), e.g. ``[model.dynamic_tables.s2]``."""
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 16])
    """Dense arch layer sizes; the last must equal ``embedding_dim``."""
    top_mlp: list[int] = field(default_factory=lambda: [64, 1])
    """Over arch layer sizes; the last must be 1."""


@dataclass(kw_only=True, slots=True)
class TierConfig:
    """One checkpoint tier, ``[[train_config.checkpoint_tiers]]``, fastest first (``docs/tiers.md``).

    Fields as :class:`reckpt.tiers.Tier`'s. The slowest tier is the ``model_dir`` (its ``url``
    may be left out): the eval results, the best checkpoint and the export read it.
    """

    name: str = ""
    url: str = ""
    every_steps: int = 0
    """The tier is due at steps divisible by this."""
    keep: int = 0
    """Newest checkpoints kept on the tier (0: all)."""
    keep_best: bool = False
    """Also keep the best checkpoint by the eval metric (the ``model_dir`` tier)."""
    shared: bool | None = None
    """Whether every node sees the tier (default: remote URLs yes, local paths no)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    num_steps: int = 0
    num_epochs: int = 0
    save_checkpoints_steps: int = 1000
    save_checkpoints_epochs: int = 0
    keep_checkpoint_max: int = 0
    fine_tune_checkpoint: str = ""
    fine_tune_ckpt_param_map: str = ""
    log_step_count_steps: int = 100
    learning_rate: float = 0.001
    """Adam learning rate of the dense part."""
    sparse_learning_rate: float = 0.05
    """Row-wise Adagrad learning rate of the (fused) embedding tables."""
    seed: int = 0
    async_save: bool = False
    async_snapshot: str = "copy"
    """How an async save freezes the state: ``"copy"`` (a host copy) or ``"fork"`` (a
    copy-on-write child process; see ``reckpt.save.async_saver`` for the trade-off)."""
    incremental_full_every: int = 0
    """Delta checkpoints (touched embedding rows + the dense part) between full ones: a full
    checkpoint after this many deltas; 0 (default) writes full checkpoints only."""
    incremental_max_delta_fraction: float = 0.2
    """A full checkpoint instead when a delta would exceed this fraction of a full one."""
    checkpoint_tiers: list[TierConfig] = field(default_factory=list)
    """Checkpoint tiers, fastest first (memory, local disk, durable): their ``every_steps`` and
    ``keep`` replace ``save_checkpoints_steps`` and ``keep_checkpoint_max``; an eval follows
    the saves that reach the ``model_dir`` tier. Empty: every checkpoint goes to ``model_dir``."""
    pipeline: bool = True
    """Train with TorchRec's ``TrainPipelineSparseDist``: the next batches are read and the
    next batch's embedding input exchange is started while this one trains
    (``docs/pipeline.md``); ``false``: the plain loop, one batch at a time. Both train the same
    batches in the same order to the same weights, and read each other's checkpoints."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    num_steps: int = 0
    """Eval batches per evaluation (0: the whole eval input)."""


@dataclass(kw_only=True, slots=True)
class ExportConfig:
    exporter_type: str = "latest"
    best_exporter_metric: str = "auc"
    metric_larger_is_better: bool | None = None  # unset: the metric's built-in direction


@dataclass(kw_only=True, slots=True)
class Config:
    model_dir: str = "model_dir"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    export_config: ExportConfig = field(default_factory=ExportConfig)

    def validate(self, source: str) -> Config:
        """Cross-field checks; raises :class:`ConfigError` naming the key."""
        t, d, m, e = self.train_config, self.data, self.model, self.export_config
        if (t.num_steps > 0) == (t.num_epochs > 0):
            raise ConfigError(
                f"{source}: set exactly one of train_config.num_steps and train_config.num_epochs"
            )
        if not 0 < t.incremental_max_delta_fraction <= 1:
            raise ConfigError(f"{source}: train_config.incremental_max_delta_fraction must be in (0, 1]")
        if t.save_checkpoints_epochs > 0 and t.num_epochs == 0:
            raise ConfigError(f"{source}: train_config.save_checkpoints_epochs needs train_config.num_epochs")
        for name in (
            "num_steps",
            "num_epochs",
            "save_checkpoints_steps",
            "save_checkpoints_epochs",
            "keep_checkpoint_max",
            "incremental_full_every",
        ):
            if getattr(t, name) < 0:
                raise ConfigError(f"{source}: train_config.{name} must be >= 0")
        if not d.sparse_columns:
            raise ConfigError(
                f"{source}: data.sparse_columns is empty; the model needs at least one id column"
                " (an embedding-bag table)"
            )
        if d.batch_size < 1:
            raise ConfigError(f"{source}: data.batch_size must be >= 1")
        if m.bottom_mlp and m.bottom_mlp[-1] != m.embedding_dim:
            raise ConfigError(
                f"{source}: model.bottom_mlp must end with model.embedding_dim ({m.embedding_dim}),"
                f" got {m.bottom_mlp}"
            )
        if not m.top_mlp or m.top_mlp[-1] != 1:
            raise ConfigError(f"{source}: model.top_mlp must end with 1, got {m.top_mlp}")
        unknown_tables = sorted(set(m.table_sizes) - set(d.sparse_columns) - set(d.sequence_columns))
        if unknown_tables:
            raise ConfigError(
                f"{source}: model.table_sizes names unknown sparse or sequence columns {unknown_tables}"
            )
        both = sorted(set(d.sparse_columns) & set(d.sequence_columns))
        if both:
            raise ConfigError(
                f"{source}: {both} listed in data.sparse_columns and data.sequence_columns; a column is"
                " one or the other"
            )
        self._validate_dynamic(source)
        self.tiers(source)
        if e.exporter_type not in ("latest", "best"):
            raise ConfigError(
                f"{source}: export_config.exporter_type must be 'latest' or 'best', got {e.exporter_type!r}"
            )
        return self

    def tiers(self, source: str = "<config>") -> list[Tier] | None:
        """``train_config.checkpoint_tiers`` as :class:`reckpt.tiers.Tier` (``None``: no tiers).

        Raises:
            ConfigError: a tier is malformed, the slowest is not ``model_dir``, or a setting the
                tiers replace is set too.
        """
        t = self.train_config
        if not t.checkpoint_tiers:
            return None
        where = f"{source}: train_config.checkpoint_tiers"
        for name, off in (
            ("save_checkpoints_epochs", 0),
            ("keep_checkpoint_max", 0),
            ("incremental_full_every", 0),
        ):
            if getattr(t, name) != off:
                raise ConfigError(
                    f"{where} set the cadence and retention of every tier: remove train_config.{name}"
                )
        out: list[Tier] = []
        for i, c in enumerate(t.checkpoint_tiers):
            url = c.url or (self.model_dir if i == len(t.checkpoint_tiers) - 1 else "")
            try:
                out.append(Tier(c.name, url, c.every_steps, c.keep, c.keep_best, c.shared))
            except ConfigError as e:
                raise ConfigError(f"{where}[{i}]: {e}") from e
        if out[-1].url != self.model_dir.rstrip("/"):
            raise ConfigError(
                f"{where}: the slowest tier ({out[-1].name!r}, {out[-1].url}) must be model_dir"
                f" ({self.model_dir}), which holds the eval results, the best checkpoint and what"
                " export reads; leave its url out to use model_dir"
            )
        return out

    def _validate_dynamic(self, source: str) -> None:
        m, d = self.model, self.data
        unknown = sorted(set(m.dynamic_tables) - set(d.sparse_columns))
        if unknown:
            seq = sorted(set(unknown) & set(d.sequence_columns))
            hint = f" ({seq} are sequence columns, which use an EmbeddingCollection table)" if seq else ""
            raise ConfigError(f"{source}: model.dynamic_tables names unknown sparse columns {unknown}{hint}")
        if m.dynamic_tables and set(m.dynamic_tables) == set(d.sparse_columns):
            raise ConfigError(
                f"{source}: model.dynamic_tables covers every sparse column; keep at least one in a"
                " regular table (remove one of them from model.dynamic_tables)"
            )
        for name, t in m.dynamic_tables.items():
            where = f"model.dynamic_tables.{name}"
            if name in m.table_sizes:
                raise ConfigError(
                    f"{source}: {name} is in model.table_sizes and {where}; a dynamic table has no size"
                )
            if t.eviction not in ("lru", "lfu"):
                raise ConfigError(f"{source}: {where}.eviction must be 'lru' or 'lfu', got {t.eviction!r}")
            for key in ("capacity", "admit_threshold"):
                if getattr(t, key) < 0:
                    raise ConfigError(f"{source}: {where}.{key} must be >= 0")
            if t.learning_rate < 0:
                raise ConfigError(f"{source}: {where}.learning_rate must be >= 0")


T = TypeVar("T")


def _build(cls: type[T], doc: Any, where: str, source: str) -> T:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [{where}] must be a table, got {type(doc).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(doc) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)} in"
            f" {f'[{where}]' if where else 'the top level'}; known keys: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path, source)  # type: ignore[arg-type]
        elif get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            if not isinstance(value, list):
                got = type(value).__name__
                raise ConfigError(f"{source}: [[{path}]] must be an array of tables, got {got}")
            item = get_args(hint)[0]
            kwargs[key] = [_build(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
        elif get_origin(hint) is dict and dataclasses.is_dataclass(get_args(hint)[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{path}] must be a table, got {type(value).__name__}")
            item = get_args(hint)[1]
            kwargs[key] = {k: _build(item, v, f"{path}.{k}", source) for k, v in value.items()}
        else:
            kwargs[key] = _check_type(value, hint, path, source)
    return cls(**kwargs)


def build_section(cls: type[T], doc: Any, where: str, source: str) -> T:
    """A config dataclass from a parsed table (TOML, or an export's JSON), checked like the file."""
    return _build(cls, doc, where, source)


def _check_type(value: Any, hint: Any, path: str, source: str) -> Any:
    origin = get_origin(hint)
    ok: bool
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is list:
        (item,) = get_args(hint)
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(v, int) for v in value.values())
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{source}: {path} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a TOML config (``None``: the defaults), then apply CLI overrides.

    Raises:
        ConfigError: unreadable TOML, unknown keys (named), wrong types, inconsistent fields.
        FileNotFoundError: the file does not exist.
    """
    source = path or "<defaults>"
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    cfg = _build(Config, doc, "", source)
    train = doc.get("train_config", {})
    if cfg.train_config.checkpoint_tiers and isinstance(train, dict) and "save_checkpoints_steps" in train:
        raise ConfigError(
            f"{source}: train_config.checkpoint_tiers set the cadence of every tier (every_steps):"
            " remove train_config.save_checkpoints_steps"
        )
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = getattr(cfg, section) if section else cfg
        setattr(target, key, value)
    return cfg
