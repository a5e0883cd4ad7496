"""The table of user mistakes: each case, the exception it raises and its exact message.

`tests/integration/test_user_mistakes.py` checks every case; `scripts/gen_mistakes_doc.py` writes
`docs/mistakes.md` from the same table (a test fails when the two drift apart).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import reckpt
from reckpt import errors
from reckpt.storage.core import StorageError, storage_for
from reckpt.testing.faults import Fault, disk_full, read_only
from tests.helpers import flip_bit, fresh, train, trained


@dataclass(frozen=True)
class Mistake:
    name: str
    run: Callable[[Path], object]
    error: type[BaseException]
    message: str  # exact message; "<dir>" stands for the case's temporary directory


def _saved(d: Path, step: int = 1, **kw: object) -> str:
    m, o = trained()
    ck = str(d / f"model.ckpt-{step}")
    reckpt.save_model(ck, m, o, **kw)  # type: ignore[arg-type]
    return ck


def _map(d: Path, text: str) -> str:
    (d / "map.txt").write_text(text)
    return str(d / "map.txt")


def _restore_with_map(d: Path, text: str) -> None:
    reckpt.restore_model(_saved(d), fresh()[0], ckpt_param_map_path=_map(d, text))


def _extra_state_over_a_users_file(d: Path) -> None:
    (d / "model.ckpt-1").mkdir()
    (d / "model.ckpt-1" / "lr_scheduler").write_text("mine")
    _saved(d, extra_states={"lr_scheduler": torch.nn.Linear(1, 1)})


def _convert_damaged(d: Path) -> None:
    from reckpt.cli._convert import verified

    ck = _saved(d)
    flip_bit(ck, at=100)
    verified(ck)


def _read_damaged(d: Path) -> None:
    from reckpt.restore.inspection import read_part

    ck = _saved(d)
    flip_bit(ck, at=100)
    read_part(ck, "model")


def _predict_damaged(d: Path) -> None:
    import json

    from reckpt.trainer.serve import load_exported

    (d / "model.safetensors").write_bytes(b"not the exported weights")
    record = {"model.safetensors": {"size": 24, "checksum": "0123456789abcdef"}}
    (d / "model_config.json").write_text(json.dumps({"files": record}))
    load_exported(str(d))


def _foreign_position(d: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reckpt.trainer.config import DataConfig
    from reckpt.trainer.data import ParquetReader

    pq.write_table(pa.table({"label": [0.0, 1.0], "d0": [0.1, 0.2], "s0": [1, 2]}), d / "part-0.parquet")
    cfg = DataConfig(dense_columns=["d0"], sparse_columns=["s0"])
    reader = ParquetReader([str(d / "part-0.parquet")], cfg, 0, 1, {"s0": 10})
    reader.adopt({"/elsewhere/part-0.parquet:0": 1, "__epochs_completed__": 0}, str(d / "model.ckpt-5"))


def _convert_over(d: Path) -> None:
    from reckpt.cli._convert import output_file

    (d / "w.safetensors").write_bytes(b"a file of the user's")
    with output_file(str(d / "w.safetensors"), overwrite=False):
        pass


def _flip_data_file(d: Path) -> None:
    ck = _saved(d)
    flip_bit(ck, at=100)
    reckpt.restore_model(ck, fresh()[0])


def _truncate_data_file(d: Path) -> None:
    ck = _saved(d)
    f = Path(ck) / "model" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-8])
    reckpt.restore_model(ck, fresh()[0])


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("true",))


def _pickle_payload(d: Path) -> None:
    import torch.distributed.checkpoint as dcp

    ck = d / "model.ckpt-1"
    dcp.save(trained()[0].state_dict(), checkpoint_id=str(ck / "model"), no_dist=True)
    (ck / "model" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    reckpt.restore_model(str(ck), fresh()[0])


def _newer_manifest(d: Path) -> None:
    ck = _saved(d)
    mf = Path(ck) / "reckpt.json"
    mf.write_text(mf.read_text().replace('"format_version": 1', '"format_version": 9'))
    reckpt.restore_model(ck, fresh()[0])


def _tampered_sidecar(d: Path) -> None:
    from reckpt.format.manifest import read_sidecar, write_sidecar

    ck = _saved(d)
    write_sidecar(storage_for(ck), ck, "metrics", {"eval": {"auc": 0.5}})
    side = Path(ck) / "reckpt.metrics.sidecar.json"
    side.write_text(side.read_text().replace("0.5", "0.9"))
    read_sidecar(storage_for(ck), ck, "metrics")


def _results(d: Path, lines: str) -> None:
    _saved(d, 1)
    (d / "train_eval_result_v2.txt").write_text(lines)


def _incomplete(d: Path) -> str:
    (d / "model.ckpt-3").mkdir()
    (d / "model.ckpt-3" / ".reckpt-in-progress").write_text("{}")
    return str(d / "model.ckpt-3")


def _foreign_optimizer(d: Path) -> None:
    m, _ = trained()
    other = torch.nn.Linear(2, 2)
    reckpt.save_model(str(d / "model.ckpt-1"), m, torch.optim.SGD(other.parameters(), lr=0.1))


def _fork_into_memory(d: Path) -> None:
    mgr = reckpt.CheckpointManager(f"memory://{d.name}/run", async_save=True, async_snapshot="fork")
    try:
        mgr.save(1, trained()[0])
    finally:
        mgr.close()


def _config(d: Path, text: str) -> None:
    from reckpt.trainer.config import load_config

    (d / "c.toml").write_text(text)
    load_config(str(d / "c.toml")).validate(str(d / "c.toml"))


def _dynamic_dump(d: Path, dim: int = 4) -> tuple[str, torch.nn.Module]:
    """A checkpoint of a model with one dynamic table (``user``), and a fresh model of width ``dim``."""
    from reckpt.dynamic import DynamicEmbedding

    def model(width: int) -> torch.nn.Module:
        m = torch.nn.Module()
        m.user = DynamicEmbedding(width, name="user")
        return m

    m = model(4)
    emb = m.get_submodule("user")
    torch.autograd.backward(emb(torch.tensor([3, 8, 11]), torch.tensor([0, 2, 3])).sum())
    ck = str(d / "model.ckpt-1")
    reckpt.save_model(ck, m)
    return ck, model(dim)


def _dynamic_shard(d: Path, edit: str) -> None:
    from reckpt.dynamic import load_dynamic

    ck, fresh = _dynamic_dump(d)
    f = Path(ck) / "dynamicemb" / "model.user" / "user_emb_values.rank_0.world_size_1"
    if edit == "truncate":
        f.write_bytes(f.read_bytes()[:-16])
    else:
        f.unlink()
    load_dynamic(ck, fresh)


def _dynamic_dim(d: Path) -> None:
    from reckpt.dynamic import load_dynamic

    ck, fresh = _dynamic_dump(d, dim=8)
    load_dynamic(ck, fresh)


DYNAMIC_CONFIG = '[data]\nsparse_columns = ["a", "b"]\n[train_config]\nnum_steps = 5\n'


SHAPE = (
    "<dir>/model.ckpt-1/model: 2 key(s) cannot be loaded because their shapes differ:\n"
    "  emb.user.weight: checkpoint 'emb.user.weight' has shape [50, 4], the current value [50, 6]\n"
    "  tower.0.weight: checkpoint 'tower.0.weight' has shape [8, 4], the current value [8, 6]\n"
    "strict_shapes=True refuses shape changes: restore without it to load the overlapping block of"
    " each (the rest keeps its current values), or map the key elsewhere or drop it."
)


def _flat_tower(d: Path) -> None:
    m = fresh()[0]
    m.tower[0].weight = torch.nn.Parameter(torch.zeros(32))  # [8, 4] in the checkpoint
    reckpt.restore_model(_saved(d), m)


def _faulty_save(d: Path, faults: list[Fault]) -> None:
    m, o = trained()
    reckpt.save_model(f"faulty://{d}/run/model.ckpt-1", m, o, storage_options={"faults": faults})


def _faulty_manager_save(d: Path, faults: list[Fault]) -> None:
    m, o = trained()
    with reckpt.CheckpointManager(f"faulty://{d}/run", storage_options={"faults": faults}) as mgr:
        mgr.save(1, m, o)


def _faulty_verify(d: Path) -> None:
    _saved(d)
    faults = [Fault("read", "EIO", "*.distcp")]
    reckpt.verify(f"faulty://{d}/model.ckpt-1", storage_options={"faults": faults})


def _edited_manifest(d: Path) -> None:
    ck = Path(_saved(d))
    manifest = ck / "reckpt.json"
    manifest.write_text(manifest.read_text().replace('"world_size": 1', '"world_size": 2'))
    reckpt.restore_model(str(ck), fresh()[0])


def _terabyte_entry(d: Path) -> None:
    import dataclasses

    ck = Path(_saved(d))
    (ck / "reckpt.json").unlink()  # a legacy checkpoint: no checksums in the way
    md_path = ck / "model" / ".metadata"
    md = pickle.loads(md_path.read_bytes())  # our own, known-good file
    md.storage_data = {k: dataclasses.replace(v, length=1 << 40) for k, v in md.storage_data.items()}
    md_path.write_bytes(pickle.dumps(md))
    reckpt.restore_model(str(ck), fresh()[0])


def _delta_chain(d: Path, encoding: str = "raw") -> str:
    """A full checkpoint at step 1 and a delta at step 2 on top of it; returns the delta."""
    from reckpt.delta.row_tracker import RowTracker
    from reckpt.delta.save import save_delta

    m, o = trained()
    tracker = RowTracker(m, tables=["emb.user.weight"])
    base = reckpt.save_model(str(d / "model.ckpt-1"), m, o)
    tracker.clear()
    train(m, o, steps=1, seed=5)
    save_delta(str(d / "model.delta-2"), m, o, tracker, base, encoding=encoding)
    return str(d / "model.delta-2")


def _delta_missing_base(d: Path) -> None:
    delta = _delta_chain(d)
    storage_for(str(d)).rm(str(d / "model.ckpt-1"), recursive=True)
    reckpt.restore_model(delta, fresh()[0])


def _delta_lossy(d: Path) -> None:
    reckpt.restore_model(_delta_chain(d, encoding="int8"), fresh()[0])


def _delta_param_map(d: Path) -> None:
    reckpt.restore_model(_delta_chain(d), fresh()[0], param_map={"tower.0.weight": "tower.0.weight"})


def _delta_misnamed(d: Path) -> None:
    from reckpt.delta.row_tracker import RowTracker
    from reckpt.delta.save import save_delta

    m, o = trained()
    tracker = RowTracker(m, tables=["emb.user.weight"])
    base = reckpt.save_model(str(d / "model.ckpt-1"), m, o)
    save_delta(str(d / "model.ckpt-2"), m, o, tracker, base)


def _tracker_unknown_table(d: Path) -> None:
    from reckpt.delta.row_tracker import RowTracker

    RowTracker(trained()[0], tables=["emb.item.weight"])


def _incremental_zero(d: Path) -> None:
    reckpt.CheckpointManager(str(d), incremental=reckpt.delta.IncrementalPolicy(full_every=0))


MISTAKES: list[Mistake] = [
    Mistake(
        "unsharded load: a model built on the meta device, not materialised",
        lambda d: _unsharded_meta(d),
        errors.ConfigError,
        "load_unsharded: 5 tensor(s) of the module are on the meta device (emb.user.weight, tower.0.bias,"
        " tower.0.weight, tower.2.bias, tower.2.weight); call reckpt.sharding.init_parameters(module, 'cpu') first",
    ),
    Mistake(
        "unsharded load: a table of another size",
        lambda d: reckpt.sharding.load_unsharded(_saved(d), fresh(rows=40)[0]),
        errors.ShapeMismatchError,
        "<dir>/model.ckpt-1/model: 1 key(s) cannot be loaded because their shapes differ:\n"
        "  emb.user.weight: checkpoint [50, 4], module [40, 4]\n"
        "Build the module with the checkpoint's sizes, or map the key elsewhere with param_map.",
    ),
    Mistake(
        "plan reuse: one table name with two sharding types in the saved plan",
        lambda d: _two_types_plan(),
        errors.ConfigError,
        "plan: table 't' is 'table_wise' in module 'a.ebc' and 'row_wise' in 'b.ebc'; planner constraints"
        " are per table name: pass a constraint for 't' yourself (it is then not pinned)",
    ),
    Mistake(
        "parameter map: a line with one name",
        lambda d: _restore_with_map(d, "a.weight b.weight\nlonely\n"),
        errors.ParamMapError,
        "<dir>/map.txt:2: expected 'current_name checkpoint_name' (two names separated by whitespace),"
        " got 1 token(s): 'lonely'",
    ),
    Mistake(
        "parameter map: a line with three names",
        lambda d: _restore_with_map(d, "a b c\n"),
        errors.ParamMapError,
        "<dir>/map.txt:1: expected 'current_name checkpoint_name' (two names separated by whitespace),"
        " got 3 token(s): 'a b c'",
    ),
    Mistake(
        "parameter map: a name mapped twice",
        lambda d: _restore_with_map(d, "a x\na y\n"),
        errors.ParamMapError,
        "<dir>/map.txt:2: 'a' is mapped twice (to 'x' and 'y'); keep one line per current name",
    ),
    Mistake(
        "parameter map: a typo in the current model's name",
        lambda d: _restore_with_map(d, "emb.usr.weight emb.user.weight\n"),
        errors.ParamMapError,
        "<dir>/model.ckpt-1: 1 parameter-map line(s) name nothing:\n"
        "  'emb.usr.weight emb.user.weight': the current model has no 'emb.usr.weight' (did you mean"
        " 'emb.user.weight'?)\n"
        "Fix the names, or pass lenient_param_map=True to skip such lines as TorchEasyRec does.",
    ),
    Mistake(
        "parameter map: a typo in the checkpoint's name",
        lambda d: _restore_with_map(d, "tower.0.weight tower.0.wieght\n"),
        errors.ParamMapError,
        "<dir>/model.ckpt-1: 1 parameter-map line(s) name nothing:\n"
        "  'tower.0.weight tower.0.wieght': the checkpoint has no 'tower.0.wieght' (did you mean"
        " 'tower.0.weight'?)\n"
        "Fix the names, or pass lenient_param_map=True to skip such lines as TorchEasyRec does.",
    ),
    Mistake(
        "restore: a checkpoint of another model (no key matches)",
        lambda d: reckpt.restore_model(_saved(d), torch.nn.Sequential(torch.nn.Linear(3, 3))),
        errors.KeyMismatchError,
        "<dir>/model.ckpt-1/model: none of the model's 2 keys is in this checkpoint (model keys such as"
        " ['0.bias', '0.weight'], checkpoint keys such as ['emb.user.weight', 'tower.0.bias', 'tower.0.weight'])."
        " It is probably another model's checkpoint: check the path, or map the names with a parameter-map file",
    ),
    Mistake(
        "parameter map: the file does not exist",
        lambda d: reckpt.restore_model(_saved(d), fresh()[0], ckpt_param_map_path=str(d / "nomap.txt")),
        errors.CheckpointNotFoundError,
        "ckpt_param_map_path <dir>/nomap.txt: file does not exist",
    ),
    Mistake(
        "restore: no checkpoint at the path",
        lambda d: reckpt.restore_model(str(d / "model.ckpt-9"), fresh()[0]),
        errors.CheckpointNotFoundError,
        "checkpoint_dir[<dir>/model.ckpt-9] not exists: no checkpoint there; check the path, or find one with"
        " latest_checkpoint(model_dir) or `reckpt ls MODEL_DIR`",
    ),
    Mistake(
        "restore: a crashed (uncommitted) save",
        lambda d: reckpt.restore_model(_incomplete(d), fresh()[0]),
        errors.IncompleteCheckpointError,
        "<dir>/model.ckpt-3: incomplete checkpoint (a save crashed or is still running); restore the previous"
        " one, e.g. latest_checkpoint(model_dir)",
    ),
    Mistake(
        "restore: a tensor's shape changed, with strict_shapes",
        lambda d: reckpt.restore_model(_saved(d), fresh(dim=6)[0], strict_shapes=True),
        errors.ShapeMismatchError,
        SHAPE,
    ),
    Mistake(
        "restore: a tensor's number of dimensions changed",
        _flat_tower,
        errors.ShapeMismatchError,
        "<dir>/model.ckpt-1/model: 1 key(s) cannot be loaded because their shapes differ:\n"
        "  tower.0.weight: checkpoint 'tower.0.weight' has shape [8, 4], the current value [32]\n"
        "A key whose number of dimensions (or tensor-ness) changed cannot be loaded: map it to another"
        " checkpoint key, or keep its initial value with a '<key> -' line in the parameter map.",
    ),
    Mistake(
        "restore: strict and keys are missing",
        lambda d: reckpt.restore_model(_saved(d), fresh(extra=True)[0], error_on_missing_keys=True),
        errors.KeyMismatchError,
        "<dir>/model.ckpt-1/model: 2 key(s) of the current model are missing from the checkpoint: extra.bias,"
        " extra.weight. Map them with a parameter-map file, or restore with error_on_missing_keys=False to keep"
        " their initial values.",
    ),
    Mistake(
        "restore: a data file was corrupted",
        _flip_data_file,
        errors.IntegrityError,
        "<dir>/model.ckpt-1: integrity check failed (1 file(s)):\n"
        "  <dir>/model.ckpt-1/model/__0_0.distcp: checksum <xxh3> differs from the manifest's <xxh3> (corrupted)\n"
        "The restored objects may hold part of this checkpoint's state: restore another checkpoint"
        " (restore_latest falls back by itself), or pass verify='first' to check every file before"
        " anything changes.",
    ),
    Mistake(
        "restore: a data file was truncated",
        _truncate_data_file,
        errors.IntegrityError,
        "<dir>/model.ckpt-1: integrity check failed (1 file(s)):\n"
        "  <dir>/model.ckpt-1/model/__0_0.distcp: size 8773 bytes, the manifest says 8781 (truncated or appended)\n"
        "Restore from another checkpoint; pass verify=False only to salvage data.",
    ),
    Mistake(
        "restore: a pickle payload in .metadata",
        _pickle_payload,
        errors.UnsafeCheckpointError,
        "<dir>/model.ckpt-1/model/.metadata: refusing to load posix.system: DCP metadata may only reference"
        " checkpoint metadata classes. The file is corrupt or was crafted to run code; do not load it with"
        " plain torch.distributed.checkpoint either.",
    ),
    Mistake(
        "restore: a checkpoint from a newer reckpt",
        _newer_manifest,
        errors.IntegrityError,
        "<dir>/model.ckpt-1/reckpt.json: format_version 9 is newer than this reckpt understands (1);"
        " upgrade reckpt",
    ),
    Mistake(
        "sidecar edited by hand",
        _tampered_sidecar,
        errors.IntegrityError,
        "<dir>/model.ckpt-1/reckpt.metrics.sidecar.json: sidecar checksum mismatch; the file was modified"
        " or corrupted",
    ),
    Mistake(
        "save: the step already exists",
        lambda d: (_saved(d), _saved(d)),
        errors.StepAlreadyExistsError,
        "<dir>/model.ckpt-1: a committed checkpoint already exists; pass overwrite=True to replace it, or save"
        " under another step",
    ),
    Mistake(
        "save: the model_dir instead of model_dir/model.ckpt-<step>",
        lambda d: (_saved(d), reckpt.save_model(str(d), *trained())),
        errors.ConfigError,
        "<dir> is a model_dir (it holds model.ckpt-1), not a checkpoint folder: saving there would replace a"
        " run's root. Save into <dir>/model.ckpt-<step> instead; nothing was written",
    ),
    Mistake(
        "save: an extra state named like a file of the user's in the target folder",
        lambda d: _extra_state_over_a_users_file(d),
        errors.ConfigError,
        "<dir>/model.ckpt-1: ['lr_scheduler'] already exist there and were not written by reckpt; this save"
        " would replace them with its own state of that name. Move them away or rename the extra state;"
        " nothing was written",
    ),
    Mistake(
        "convert: the output file already exists",
        lambda d: _convert_over(d),
        FileExistsError,
        "<dir>/w.safetensors: already exists; pass --overwrite to replace it, or choose another path",
    ),
    Mistake(
        "save: an extra state named like a part",
        lambda d: _saved(d, extra_states={"model": torch.nn.Linear(1, 1)}),
        errors.ConfigError,
        "extra state name 'model' is not usable as a checkpoint entry: use letters, digits, '_' or '-', not"
        " starting with 'reckpt', and none of ['dataloader_state.json', 'delta_rows', 'dynamicemb', 'meta', 'model',"
        " 'optimizer', 'plan']",
    ),
    Mistake(
        "save: an extra state without state_dict()",
        lambda d: _saved(d, extra_states={"sched": 3}),
        errors.ConfigError,
        "extra_states['sched'] has no state_dict() method (int)",
    ),
    Mistake(
        "save: user_metadata that is not JSON",
        lambda d: _saved(d, user_metadata={"x": object}),
        errors.ConfigError,
        "user_metadata must be JSON-serialisable: Object of type type is not JSON serializable",
    ),
    Mistake(
        "save: an optimizer of another model",
        _foreign_optimizer,
        errors.ConfigError,
        "optimizer param_groups[0] holds a parameter of shape (2, 2) that is not a parameter of the model passed"
        " alongside it; pass the model whose parameters the optimizer was built from",
    ),
    Mistake(
        "save: an unknown optimizer layout",
        lambda d: _saved(d, optimizer_layout="rows"),
        errors.ConfigError,
        "optimizer layout must be 'name' or 'index', got 'rows'",
    ),
    Mistake(
        "async save: an unknown snapshot mode",
        lambda d: reckpt.CheckpointManager(str(d / "run"), async_save=True, async_snapshot="cow"),
        errors.ConfigError,
        "async_snapshot must be one of copy, fork; got 'cow'",
    ),
    Mistake(
        "async save: a fork snapshot into memory://",
        _fork_into_memory,
        errors.ConfigError,
        'async_snapshot="fork" cannot write to memory:// (the store lives in this process); use'
        ' async_snapshot="copy"',
    ),
    Mistake(
        "an unsupported URL scheme",
        lambda d: reckpt.latest_checkpoint("nosuch://bucket/run"),
        errors.ConfigError,
        "cannot open storage for 'nosuch://bucket/run': Protocol not known: nosuch. Use a local path or a URL"
        " whose fsspec backend is installed (e.g. 's3://' needs the 's3fs' package).",
    ),
    Mistake(
        "latest: an explicit checkpoint that never committed",
        lambda d: reckpt.latest_checkpoint(_incomplete(d)),
        errors.IncompleteCheckpointError,
        "<dir>/model.ckpt-3: checkpoint was never committed",
    ),
    Mistake(
        "latest: an explicit checkpoint that does not exist",
        lambda d: reckpt.latest_checkpoint(str(d / "model.ckpt-4")),
        errors.CheckpointNotFoundError,
        "<dir>/model.ckpt-4: checkpoint does not exist",
    ),
    Mistake(
        "best: a metric that is not recorded",
        lambda d: (
            _results(d, '{"global_step": 1, "auc": 0.5}\n'),
            reckpt.best_checkpoint(str(d), metric="ndcg"),
        ),
        errors.ConfigError,
        "<dir>/train_eval_result_v2.txt: metric 'ndcg' is not recorded; recorded metrics: ['auc']."
        " Pick one of them (best_exporter_metric / --metric).",
    ),
    Mistake(
        "best: several metrics, none named, no auc",
        lambda d: (
            _results(d, '{"global_step": 1, "gauc": 0.5, "logloss": 0.4}\n'),
            reckpt.best_checkpoint(str(d)),
        ),
        errors.ConfigError,
        "<dir>/train_eval_result_v2.txt: several metrics are recorded (gauc, logloss) and none was named;"
        " set best_exporter_metric (or metric=) to one of them",
    ),
    Mistake(
        "lease: a checkpoint that does not exist",
        lambda d: reckpt.lifecycle.lease(str(d / "model.ckpt-5")).__enter__(),
        errors.CheckpointNotFoundError,
        "<dir>/model.ckpt-5: no committed checkpoint to lease",
    ),
    Mistake(
        "lease: a non-positive TTL",
        lambda d: reckpt.lifecycle.lease(str(d / "model.ckpt-5"), ttl_s=0).__enter__(),
        errors.ConfigError,
        "lease ttl_s must be > 0, got 0",
    ),
    Mistake(
        "lease: a path that is not a checkpoint",
        lambda d: reckpt.lifecycle.lease(str(d)).__enter__(),
        errors.ConfigError,
        "<dir>: a lease needs a checkpoint path named model.ckpt-<step>",
    ),
    Mistake(
        "manager: a negative keep_checkpoint_max",
        lambda d: reckpt.CheckpointManager(str(d), keep_checkpoint_max=-1),
        errors.ConfigError,
        "keep_checkpoint_max must be >= 0, got -1",
    ),
    Mistake(
        "manager: an event-time trigger with a quorum outside (0, 1]",
        lambda d: reckpt.CheckpointManager(str(d)).set_save_policy(ts_interval_s=60, ts_quorum=0),
        errors.ConfigError,
        "ts_quorum must be in (0, 1] when ts_interval_s or ts_targets is set, got 0; pass the fraction of ranks whose data must reach a boundary, e.g. 0.5",
    ),
    Mistake(
        "retention: keep the last 0", lambda d: reckpt.LatestN(0), ValueError, "LatestN.n must be >= 1, got 0"
    ),
    Mistake(
        "best: a metric of unknown direction, and no direction given",
        lambda d: reckpt.BestN(1, "ctr_score"),
        ValueError,
        "metric 'ctr_score' has no built-in direction (larger is better: auc, gauc, grouped_auc, accuracy, acc,"
        " recall, precision, ndcg, mrr, f1; smaller: loss, logloss, mse, mae, rmse); say which way is better:"
        " metric_larger_is_better= / larger_is_better=, or --larger-is-better / --smaller-is-better",
    ),
    Mistake(
        "read values (export, inspect): a damaged checkpoint",
        lambda d: _read_damaged(d),
        errors.IntegrityError,
        "<dir>/model.ckpt-1: integrity check failed (1 file(s)):\n"
        "  <dir>/model.ckpt-1/model/__0_0.distcp: checksum <xxh3> differs from the manifest's <xxh3> (corrupted)\n"
        "Refusing to read values from a damaged checkpoint: use another one, or pass verify=False (--no-verify)"
        " to salvage what is readable.",
    ),
    Mistake(
        "predict: a damaged export",
        lambda d: _predict_damaged(d),
        errors.IntegrityError,
        "--export-dir <dir>: the export is damaged (<dir>/model.safetensors: size 24 checksum <xxh3>, the export"
        " recorded {'size': 24, 'checksum': '<xxh3>'}); export again, or pass --no-verify to use it anyway",
    ),
    Mistake(
        "resume: the saved data position names other input files",
        lambda d: _foreign_position(d),
        errors.ConfigError,
        "<dir>/model.ckpt-5: the saved data position names ['/elsewhere/part-0.parquet:0'], which this run does"
        " not read (1 file(s) in <dir>); resuming would re-read or skip data. Resume with the same"
        " input paths, or start a new model_dir with --fine-tune-checkpoint (weights"
        " only, the data pass restarts)",
    ),
    Mistake(
        "convert: a damaged checkpoint",
        lambda d: _convert_damaged(d),
        errors.IntegrityError,
        "<dir>/model.ckpt-1: integrity check failed (1 file(s)):\n"
        "  <dir>/model.ckpt-1/model/__0_0.distcp: checksum <xxh3> differs from the manifest's <xxh3> (corrupted)\n"
        "Refusing to convert a damaged checkpoint: use another one, or pass --no-verify to salvage what is"
        " readable.",
    ),
    Mistake(
        "config: an unknown key",
        lambda d: _config(d, "[model]\nembeding_dim = 4\n"),
        errors.ConfigError,
        "<dir>/c.toml: unknown key(s) 'embeding_dim' in [model]; known keys: bottom_mlp, dynamic_tables,"
        " embedding_dim, num_embeddings, table_sizes, top_mlp",
    ),
    Mistake(
        "config: a value of the wrong type",
        lambda d: _config(d, '[data]\nbatch_size = "big"\n'),
        errors.ConfigError,
        "<dir>/c.toml: data.batch_size must be int, got 'big'",
    ),
    Mistake(
        "config: both num_steps and num_epochs",
        lambda d: _config(d, "[train_config]\nnum_steps = 5\nnum_epochs = 1\n"),
        errors.ConfigError,
        "<dir>/c.toml: set exactly one of train_config.num_steps and train_config.num_epochs",
    ),
    Mistake(
        "config: checkpoint tiers next to save_checkpoints_steps",
        lambda d: _config(
            d,
            '[data]\nsparse_columns = ["a"]\n[train_config]\nnum_steps = 5\nsave_checkpoints_steps = 10\n'
            '[[train_config.checkpoint_tiers]]\nname = "durable"\nevery_steps = 10\n',
        ),
        errors.ConfigError,
        "<dir>/c.toml: train_config.checkpoint_tiers set the cadence of every tier (every_steps): remove"
        " train_config.save_checkpoints_steps",
    ),
    Mistake(
        "config: the slowest checkpoint tier is not the model_dir",
        lambda d: _config(
            d,
            'model_dir = "runs/a"\n[data]\nsparse_columns = ["a"]\n[train_config]\nnum_steps = 5\n'
            '[[train_config.checkpoint_tiers]]\nname = "memory"\nurl = "/dev/shm/a"\nevery_steps = 5\n'
            '[[train_config.checkpoint_tiers]]\nname = "durable"\nurl = "s3://b/a"\nevery_steps = 10\n',
        ),
        errors.ConfigError,
        "<dir>/c.toml: train_config.checkpoint_tiers: the slowest tier ('durable', s3://b/a) must be"
        " model_dir (runs/a), which holds the eval results, the best checkpoint and what export reads;"
        " leave its url out to use model_dir",
    ),
    Mistake(
        "config: a checkpoint tier without a cadence",
        lambda d: _config(
            d,
            '[data]\nsparse_columns = ["a"]\n[train_config]\nnum_steps = 5\n'
            '[[train_config.checkpoint_tiers]]\nname = "durable"\n',
        ),
        errors.ConfigError,
        "<dir>/c.toml: train_config.checkpoint_tiers[0]: tier 'durable': every_steps must be an int >= 1,"
        " got 0",
    ),
    Mistake(
        "config: the bottom MLP does not end at the embedding size",
        lambda d: _config(
            d, '[data]\nsparse_columns = ["a"]\n[model]\nbottom_mlp = [8, 4]\n[train_config]\nnum_steps = 5\n'
        ),
        errors.ConfigError,
        "<dir>/c.toml: model.bottom_mlp must end with model.embedding_dim (16), got [8, 4]",
    ),
    Mistake(
        "config: an unknown exporter_type",
        lambda d: _config(
            d,
            '[data]\nsparse_columns = ["a"]\n[train_config]\nnum_steps = 5\n'
            '[export_config]\nexporter_type = "newest"\n',
        ),
        errors.ConfigError,
        "<dir>/c.toml: export_config.exporter_type must be 'latest' or 'best', got 'newest'",
    ),
    Mistake(
        "config: the file does not exist",
        lambda d: _config_missing(d),
        errors.ConfigError,
        "config file <dir>/missing.toml does not exist",
    ),
    Mistake(
        "dynamic table: a shard file cut short",
        lambda d: _dynamic_shard(d, "truncate"),
        errors.IntegrityError,
        "<dir>/model.ckpt-1/dynamicemb/model.user/user_emb_values.rank_0.world_size_1: 32 bytes, expected 48"
        " (3 keys x 4 float32); the file is truncated or does not belong to this table",
    ),
    Mistake(
        "dynamic table: a shard file missing",
        lambda d: _dynamic_shard(d, "remove"),
        errors.CheckpointNotFoundError,
        "<dir>/model.ckpt-1/dynamicemb/model.user/user_emb_values.rank_0.world_size_1: shard file missing"
        " (a dump of world size 1 needs all 1 shards); the checkpoint is incomplete",
    ),
    Mistake(
        "dynamic table: restored into a table of another width",
        _dynamic_dim,
        errors.IntegrityError,
        "<dir>/model.ckpt-1/dynamicemb/model.user/user_emb_values.rank_0.world_size_1: 48 bytes, expected 96"
        " (3 keys x 8 float32); the file is truncated or does not belong to this table",
    ),
    Mistake(
        "DynamicEmbedding: an unknown eviction policy",
        lambda d: reckpt.dynamic.DynamicEmbedding(4, eviction="fifo"),
        errors.ConfigError,
        "DynamicEmbedding: eviction must be one of ('lru', 'lfu'), got 'fifo'",
    ),
    Mistake(
        "config: model.dynamic_tables names an unknown sparse column",
        lambda d: _config(d, DYNAMIC_CONFIG + "[model.dynamic_tables.c]\n"),
        errors.ConfigError,
        "<dir>/c.toml: model.dynamic_tables names unknown sparse columns ['c']",
    ),
    Mistake(
        "config: every sparse column on a dynamic table",
        lambda d: _config(d, DYNAMIC_CONFIG + "[model.dynamic_tables.a]\n[model.dynamic_tables.b]\n"),
        errors.ConfigError,
        "<dir>/c.toml: model.dynamic_tables covers every sparse column; keep at least one in a regular"
        " table (remove one of them from model.dynamic_tables)",
    ),
    Mistake(
        "config: an unknown dynamic-table eviction",
        lambda d: _config(d, DYNAMIC_CONFIG + '[model.dynamic_tables.a]\neviction = "fifo"\n'),
        errors.ConfigError,
        "<dir>/c.toml: model.dynamic_tables.a.eviction must be 'lru' or 'lfu', got 'fifo'",
    ),
    # Storage that fails, simulated with the fault-injecting filesystem (reckpt.testing.faults): as
    # root, chmod does not make a directory read-only.
    Mistake(
        "save: a read-only model_dir (EROFS)",
        lambda d: _faulty_save(d, read_only()),
        StorageError,
        "faulty://<dir>/run: mkdir failed (EROFS: Read-only file system); the location is read-only;"
        " choose a writable model_dir",
    ),
    Mistake(
        "manager: a full disk (ENOSPC)",
        lambda d: _faulty_manager_save(d, disk_full()),
        StorageError,
        "faulty://<dir>/run/.reckpt-lock.json: write failed (ENOSPC: No space left on device); the storage"
        " is full; free space or choose another model_dir",
    ),
    Mistake(
        "save: the disk fills up while writing data (ENOSPC)",
        lambda d: _faulty_save(d, disk_full(path="*.distcp")),
        StorageError,
        "faulty://<dir>/run/.reckpt-staging.<xxh3>/model/__0_0.distcp: write failed (ENOSPC: No space left"
        " on device); the storage is full; free space or choose another model_dir",
    ),
    Mistake(
        "verify: the disk keeps returning I/O errors (EIO)",
        _faulty_verify,
        StorageError,
        "faulty://<dir>/model.ckpt-1/model/__0_0.distcp: read failed (EIO: Input/output error); gave up"
        " after 4 attempt(s); check the storage and retry",
    ),
    Mistake(
        "restore: a manifest edited by hand",
        _edited_manifest,
        errors.IntegrityError,
        "<dir>/model.ckpt-1/reckpt.json: the manifest's own checksum does not match its content (corrupted);"
        " restore from another checkpoint",
    ),
    Mistake(
        "restore: metadata claiming more bytes than its file",
        _terabyte_entry,
        errors.UnsafeCheckpointError,
        "<dir>/model.ckpt-1/model/.metadata: entry 'emb.user.weight' claims bytes up to 1099511627776 of"
        " __0_0.distcp, which holds 8781; the metadata does not match the data (corrupted or crafted);"
        " refusing to read it",
    ),
    Mistake(
        "delta: restoring a delta whose base was deleted",
        _delta_missing_base,
        errors.CheckpointNotFoundError,
        "<dir>/model.delta-2: its chain is broken: link <dir>/model.ckpt-1 does not exist",
    ),
    Mistake(
        "delta: restoring an int8 delta dump without allow_lossy",
        _delta_lossy,
        errors.ConfigError,
        "<dir>/model.delta-2 is a lossy (int8) delta dump; pass allow_lossy=True to restore it",
    ),
    Mistake(
        "delta: a parameter map with a delta checkpoint",
        _delta_param_map,
        errors.ConfigError,
        "param_map is not supported when restoring a delta checkpoint (<dir>/model.delta-2); restore it"
        " and save a full checkpoint first",
    ),
    Mistake(
        "delta: saving a delta under a model.ckpt- name",
        _delta_misnamed,
        errors.ConfigError,
        "<dir>/model.ckpt-2: a delta checkpoint must be named model.delta-<step>",
    ),
    Mistake(
        "RowTracker: a table the model does not have",
        _tracker_unknown_table,
        errors.ConfigError,
        "RowTracker tables ['emb.item.weight'] name no embedding table of the model; trackable keys look"
        " like 'ebc.embedding_bags.<table>.weight' or '<module>.weight'",
    ),
    Mistake(
        "manager: incremental checkpoints with full_every 0",
        _incremental_zero,
        errors.ConfigError,
        "IncrementalPolicy.full_every must be >= 1, got 0",
    ),
]


def _unsharded_meta(d: Path) -> None:
    ck = _saved(d)
    with torch.device("meta"):
        model = fresh()[0]
    reckpt.sharding.load_unsharded(ck, model)


def _two_types_plan() -> None:
    entry = {"compute_kernel": "fused", "ranks": [0]}
    plan = {
        "a.ebc": {"t": {"sharding_type": "table_wise", **entry}},
        "b.ebc": {"t": {"sharding_type": "row_wise", **entry}},
    }
    reckpt.sharding.plan_constraints(plan, pin_all=True)


def _config_missing(d: Path) -> None:
    from reckpt.trainer.config import load_config

    load_config(str(d / "missing.toml"))


def observed(case: Mistake, d: Path) -> BaseException:
    """Run a case in directory ``d`` and return the exception it raised (AssertionError if none)."""
    try:
        case.run(d)
    except BaseException as e:
        return e
    raise AssertionError(f"{case.name}: no error raised")


def normalise(message: str, d: Path) -> str:
    """The message with the case's directory as ``<dir>`` and checksums as ``<xxh3>``."""
    return re.sub(r"\b[0-9a-f]{16}\b", "<xxh3>", message.replace(str(d), "<dir>"))


def render_markdown(rows: list[tuple[Mistake, str]]) -> str:
    """docs/mistakes.md from the table and the observed messages."""
    out = [
        "# User mistakes and their errors",
        "",
        "Generated by `python scripts/gen_mistakes_doc.py` from `tests/helpers/mistakes.py`; the test suite",
        "checks every message and that this page matches. `<dir>` is the directory involved.",
        "",
        "| # | mistake | error | message |",
        "|---|---|---|---|",
    ]
    for i, (case, message) in enumerate(rows, start=1):
        text = message.replace("|", "\\|").replace("\n", "<br>")
        out.append(f"| {i} | {case.name} | `{case.error.__name__}` | {text} |")
    return "\n".join(out) + "\n"
