"""End-to-end: `reckpt train / eval / export / predict` as subprocesses, 1 and 2 gloo processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reckpt
from reckpt.restore.inspection import read_part
from tests.helpers import assert_state_dicts_equal, flip_byte
from tests.helpers.paths import REPO
from tests.helpers.processes import child_env
from tests.helpers.trainer_runs import EVERY, STEPS, cli, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    proc = cli("make-data", "--out", str(root), "--rows", "8000", "--eval-rows", "2000")
    assert proc.returncode == 0, proc.stderr
    return root


def final_state(model_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = str(model_dir / f"model.ckpt-{STEPS - 1}")
    out = {f"model/{k}": v for k, v in read_part(ckpt, "model").items()}
    out.update(
        {f"optimizer/{k}": v for k, v in read_part(ckpt, "optimizer").items() if isinstance(v, torch.Tensor)}
    )
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_train_kill_resume_exact_export_predict(tmp_path: Path, data: Path, world: int) -> None:
    straight = tmp_path / "straight"
    cfg = write_config(tmp_path / "a.toml", data, straight)
    proc = cli("train", cfg, world=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latest" in proc.stdout and "best" in proc.stdout  # the summary table
    steps = [c.step for c in reckpt.list_checkpoints(str(straight)) if c.committed]
    assert steps == [20, 40, 59]
    lines = [json.loads(x) for x in (straight / "train_eval_result_v2.txt").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == [20, 40, 59]
    assert all(0.5 < x["auc"] <= 1.0 and x["logloss"] > 0 for x in lines)
    assert list(straight.glob("events.out.tfevents.*")), "TensorBoard summaries"
    plan = json.loads((straight / "model.ckpt-59" / "plan").read_text())
    assert any("embedding_bag_collection" in k for k in plan)
    assert "sequence_arch.embedding_collection" in plan  # the history feature's table
    assert "model/sequence_arch.embedding_collection.embeddings.t_h0.weight" in final_state(straight)
    state = json.loads((straight / "model.ckpt-59" / "dataloader_state.json").read_text())
    # 2 files x ceil(4000 / world / 128) batches per pass: one pass ends before step 59 only on 2 ranks.
    assert state["__epochs_completed__"] == world - 1 and len([k for k in state if ":" in k]) == 2 * world
    assert state["__world_size__"] == world  # a resume on another number re-divides (test_elastic.py)

    # Killed with SIGKILL after step 45 (last checkpoint: 40), resumed: bitwise identical. This
    # run saves asynchronously (a fork snapshot on 2 ranks, a host copy on 1). The killed leg
    # trains with the plain loop, the resumed one (like the straight run) through TorchRec's
    # pipeline: the plain loop's checkpoint resumes in the pipeline, to the same weights.
    resumed = tmp_path / "resumed"
    snapshot = "fork" if world == 2 else "copy"
    async_cfg = f'async_save = true\nasync_snapshot = "{snapshot}"'
    cfg_b = write_config(tmp_path / "b.toml", data, resumed, train=async_cfg)
    plain_b = write_config(tmp_path / "b-plain.toml", data, resumed, train=f"{async_cfg}\npipeline = false")
    killed = cli("train", plain_b, world=world, env={"RECKPT_TRAIN_KILL_AT_STEP": "45"})
    assert killed.returncode != 0
    assert reckpt.latest_checkpoint(str(resumed))[1] == 40
    again = cli("train", cfg_b, world=world)
    assert again.returncode != 0 and "pass --continue-train" in again.stderr
    proc = cli("train", cfg_b, "--continue_train", world=world)  # the underscore alias works too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"restore {resumed}/model.ckpt-40: " in proc.stderr and "GB/s, tier disk" in proc.stderr
    assert_state_dicts_equal(final_state(straight), final_state(resumed))

    # Export the best checkpoint; predict in a plain process matches the trained model.
    export = tmp_path / "export"
    proc = cli("export", cfg, "--export-dir", str(export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((export / "model_config.json").read_text())
    best = max(lines, key=lambda x: x["auc"])
    assert meta["step"] == best["global_step"]
    out = tmp_path / "scores.parquet"
    proc = cli("predict", "--export-dir", str(export), "--input", str(data / "eval"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    from reckpt.trainer.metrics import auc

    scores = torch.from_numpy(pq.read_table(out).column("score").to_numpy())
    labels = torch.from_numpy(pq.read_table(data / "eval" / "part-000.parquet").column("label").to_numpy())
    # The exported model scores every eval row; its AUC is the one the trainer recorded.
    assert abs(auc(labels[: len(scores)], scores) - best["auc"]) < 1e-6
    # And its scores are the checkpoint's, restored by the library into a plain model.
    from reckpt.trainer.config import load_config
    from reckpt.trainer.data import ParquetReader
    from reckpt.trainer.model import build_model, table_rows

    conf = load_config(cfg)
    plain = build_model(conf)
    reckpt.restore_model(meta["checkpoint"], plain)
    plain.eval()
    reader = ParquetReader([str(data / "eval" / "part-000.parquet")], conf.data, 0, 1, table_rows(conf))
    with torch.no_grad():
        want = torch.cat([torch.sigmoid(plain(b.dense, b.sparse).squeeze(-1)) for b in reader.batches()])
    assert torch.allclose(scores, want.to(scores.dtype), rtol=0, atol=1e-6)

    # A flipped bit in the checkpoint: export refuses (and writes nothing), --no-verify salvages.
    if world == 1:
        flip_byte(next((Path(meta["checkpoint"]) / "model").glob("*.distcp")))
        damaged = tmp_path / "export-damaged"
        proc = cli("export", cfg, "--export-dir", str(damaged))
        assert proc.returncode != 0 and "integrity check failed" in proc.stderr, proc.stderr[-3000:]
        assert not damaged.exists()
        proc = cli("export", cfg, "--export-dir", str(damaged), "--no-verify")
        assert proc.returncode == 0, proc.stderr[-3000:]
        # predict checks the export's files against what export recorded
        flip_byte(export / "model.safetensors", at=-5)
        args = ("predict", "--export-dir", str(export), "--input", str(data / "eval"), "--output", str(out))
        proc = cli(*args)
        assert proc.returncode != 0 and "the export is damaged" in proc.stderr, proc.stderr[-3000:]
        assert cli(*args, "--no-verify").returncode == 0


DYNAMIC = """
[model.dynamic_tables.s1]
capacity = 150
eviction = "lfu"
[model.dynamic_tables.s2]
admit_threshold = 2
"""


def dynamic_files(ckpt: Path) -> dict[str, bytes]:
    root = ckpt / "dynamicemb"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dynamic_features_train_and_resume_exactly(tmp_path: Path, data: Path) -> None:
    """Two features on dynamic tables next to a TorchRec table, 2 processes, killed and resumed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = cli("train", write_config(tmp_path / "a.toml", data, straight, model=DYNAMIC), world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = straight / f"model.ckpt-{STEPS - 1}"
    files = dynamic_files(final)
    assert "model.dynamic.s1/t_s1_emb_values.rank_1.world_size_2" in files
    assert "model.dynamic.s2/t_s2_counter_keys.rank_0.world_size_2" in files
    for rank in (0, 1):  # every rank holds only its keys; LFU eviction kept each under capacity
        keys = torch.frombuffer(
            bytearray(files[f"model.dynamic.s1/t_s1_emb_keys.rank_{rank}.world_size_2"]), dtype=torch.int64
        )
        assert 100 < len(keys) <= 150 and bool((keys % 2 == rank).all())
    # Not part of the TorchRec model: no state dict key, no sharding plan entry.
    assert not [k for k in final_state(straight) if "dynamic" in k]
    assert "dynamic" not in (final / "plan").read_text()
    assert reckpt.verify(str(final)).ok

    # killed in the pipeline (the default), resumed in the plain loop
    cfg = write_config(tmp_path / "b.toml", data, resumed, model=DYNAMIC)
    killed = cli("train", cfg, world=2, env={"RECKPT_TRAIN_KILL_AT_STEP": "45"})
    assert killed.returncode != 0 and reckpt.latest_checkpoint(str(resumed))[1] == 40
    cfg = write_config(tmp_path / "b-plain.toml", data, resumed, model=DYNAMIC, train="pipeline = false")
    proc = cli("train", cfg, "--continue-train", world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_state_dicts_equal(final_state(straight), final_state(resumed))
    assert dynamic_files(resumed / f"model.ckpt-{STEPS - 1}") == files


def test_fine_tune_with_param_map_and_eval(tmp_path: Path, data: Path) -> None:
    base = tmp_path / "base"
    assert cli("train", write_config(tmp_path / "base.toml", data, base, sparse=("s0", "s1"))).returncode == 0
    # The new model adds a table (s2); the map initialises it from s1, weights and optimizer.
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags"
    mp = tmp_path / "map.txt"
    mp.write_text(
        f"{prefix}.t_s2.weight {prefix}.t_s1.weight\n"
        f"state.{prefix}.t_s2.weight.t_s2.momentum1 state.{prefix}.t_s1.weight.t_s1.momentum1\n"
        "# the interaction output grew with the new table: this layer starts fresh\n"
        "over_arch.model.0._mlp.0._linear.weight -\n"
    )
    tuned = tmp_path / "tuned"
    cfg = write_config(tmp_path / "tuned.toml", data, tuned)
    proc = cli("train", cfg, "--fine-tune-checkpoint", str(base), "--fine-tune-ckpt-param-map", str(mp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"remapped: {prefix}.t_s2.weight <- {prefix}.t_s1.weight" in proc.stderr
    assert "reinitialized: over_arch.model.0._mlp.0._linear.weight" in proc.stderr
    assert [c.step for c in reckpt.list_checkpoints(str(tuned))] == [20, 40, 59]  # numbering restarts
    proc = cli(
        "train",
        cfg,
        "--model-dir",
        str(tmp_path / "tuned2"),
        "--fine-tune-checkpoint",
        str(base / "model.ckpt-40"),
        "--fine-tune-ckpt-param-map",
        str(mp),
        "--ignore-restore-optimizer",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  model: loaded=" in proc.stderr and "  optimizer:" not in proc.stderr
    proc = cli("eval", cfg, "--checkpoint-path", str(tuned / "model.ckpt-40"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads((tuned / "eval_result.txt").read_text().splitlines()[-1])
    assert line["global_step"] is None and 0.5 < line["auc"] <= 1


def test_bad_input_is_a_clear_error(tmp_path: Path, data: Path) -> None:
    good = write_config(tmp_path / "g.toml", data, tmp_path / "run")
    text = Path(good).read_text()

    def run(name: str, content: str, *flags: str):
        p = tmp_path / name
        p.write_text(content)
        return cli("train", str(p), *flags)

    proc = run("unknown.toml", text.replace("[model]", "[model]\nembeding_dim = 4"))
    assert proc.returncode == 2 and "unknown key(s) 'embeding_dim' in [model]" in proc.stderr
    proc = run("nodata.toml", text.replace(f"{data}/train", f"{data}/nowhere"))
    assert proc.returncode == 1 and "data.train_input_path: no Parquet file" in proc.stderr
    proc = run("badcol.toml", text.replace('"d3"]', '"d9"]'))
    assert proc.returncode == 2 and "column(s) ['d9']" in proc.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(data / "eval" / "part-000.parquet").slice(0, 0), empty)
    proc = run("empty.toml", text.replace(f"{data}/train", str(empty)))
    assert proc.returncode == 2 and "empty Parquet" in proc.stderr
    assert pa is not None
    # A checkpoint of a different model: continuing with another embedding size.
    assert cli("train", good).returncode == 0
    proc = run(
        "other.toml",
        text.replace("embedding_dim = 8", "embedding_dim = 4").replace("[16, 8]", "[16, 4]"),
        "--continue-train",
    )
    assert proc.returncode == 2 and "shapes differ" in proc.stderr and "[500, 8]" in proc.stderr


def test_train_into_s3_model_dir(tmp_path: Path, data: Path, s3_root: str) -> None:
    cfg = write_config(tmp_path / "s3.toml", data, Path("unused"))
    text = Path(cfg).read_text().replace('model_dir = "unused"', f'model_dir = "{s3_root}/run"')
    Path(cfg).write_text(text)
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.step for c in reckpt.list_checkpoints(f"{s3_root}/run")] == [20, 40, 59]
    proc = cli("train", cfg, "--continue-train")  # nothing left to do: no new checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reckpt.latest_checkpoint(f"{s3_root}/run")[1] == 59
    # the training log goes through the storage layer: rewritten at each save, then appended to
    from reckpt.storage.core import storage_for

    log = storage_for(s3_root).read_text(f"{s3_root}/run/train_log.jsonl").splitlines()
    events = [(r["step"], r["event"]) for r in map(json.loads, log) if r.get("event") in ("save", "restore")]
    assert events == [(20, "save"), (40, "save"), (59, "save"), (59, "restore")]


def plain_restored(cfg: str, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint (a delta's whole chain) restored into a plain model: weights and dynamic rows."""
    from reckpt.dynamic import DynamicEmbedding
    from reckpt.trainer.config import load_config
    from reckpt.trainer.model import build_model

    plain = build_model(load_config(cfg))
    reckpt.restore_model(str(checkpoint), plain)
    out = dict(plain.state_dict())
    for name, m in plain.named_modules():
        if isinstance(m, DynamicEmbedding):
            st = m.table.export()  # every row, sorted by key
            fields = ("keys", "values", "opt_values", "scores", "counter_keys", "counter_freqs")
            out.update({f"{name}/{f}": getattr(st, f) for f in fields})
    return out


def test_incremental_checkpoints_resume_exactly_and_export_quantized(tmp_path: Path, data: Path) -> None:
    """Delta checkpoints in the trainer: full at 20, deltas at 40 and 59; a kill at 45 resumes from
    the delta chain bitwise; the final delta exports (int8) and predicts."""
    train = "incremental_full_every = 2\nincremental_max_delta_fraction = 1.0"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg_a = write_config(tmp_path / "a.toml", data, straight, model=DYNAMIC, train=train)
    proc = cli("train", cfg_a)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = reckpt.list_checkpoints(str(straight))
    assert [(c.step, c.kind) for c in infos] == [(20, "full"), (40, "delta"), (59, "delta")]
    last = straight / f"model.delta-{STEPS - 1}"
    assert reckpt.verify(str(last)).ok

    cfg_b = write_config(tmp_path / "b.toml", data, resumed, model=DYNAMIC, train=train)
    killed = cli("train", cfg_b, env={"RECKPT_TRAIN_KILL_AT_STEP": "45"})
    assert killed.returncode != 0
    proc = cli("train", cfg_b, "--continue-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = plain_restored(cfg_a, last), plain_restored(cfg_b, resumed / f"model.delta-{STEPS - 1}")
    assert_state_dicts_equal(want, got)

    for quantize in ("raw", "int8"):
        export = tmp_path / f"export-{quantize}"
        ex = cli(
            "export",
            cfg_a,
            "--export-dir",
            str(export),
            "--checkpoint-path",
            str(last),
            "--quantize",
            quantize,
        )
        assert ex.returncode == 0, ex.stderr[-3000:]
        out = tmp_path / f"scores-{quantize}.parquet"
        pr = cli("predict", "--export-dir", str(export), "--input", str(data / "eval"), "--output", str(out))
        assert pr.returncode == 0, pr.stderr[-3000:]
    import pyarrow.parquet as pq

    raw = torch.from_numpy(pq.read_table(tmp_path / "scores-raw.parquet").column("score").to_numpy())
    q = torch.from_numpy(pq.read_table(tmp_path / "scores-int8.parquet").column("score").to_numpy())
    assert 0 < float((raw - q).abs().max()) < 0.05  # lossy, close
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "export-int8") < size(tmp_path / "export-raw")


def test_continue_train_skips_a_damaged_newest_checkpoint(tmp_path: Path, data: Path) -> None:
    """--continue-train resumes from the newest checkpoint that verifies and redoes the rest."""
    import shutil

    straight = tmp_path / "straight"
    proc = cli("train", write_config(tmp_path / "a.toml", data, straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    flip_byte(next((damaged / f"model.ckpt-{STEPS - 1}" / "model").glob("*.distcp")), mask=0x40)
    proc = cli("train", write_config(tmp_path / "b.toml", data, damaged), "--continue-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {damaged}/model.ckpt-{STEPS - 1}" in proc.stderr
    assert reckpt.verify(str(damaged / f"model.ckpt-{STEPS - 1}")).ok  # replaced by the redone save
    assert_state_dicts_equal(final_state(straight), final_state(damaged))


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path: Path, data: Path) -> None:
    """Preemption: SIGTERM (and SLURM's SIGUSR1) finish the step, save, commit and exit 0."""
    import signal

    run = tmp_path / "run"
    cfg = Path(write_config(tmp_path / "long.toml", data, run, train="log_step_count_steps = 1"))
    cfg.write_text(cfg.read_text().replace(f"num_steps = {STEPS}", "num_steps = 1000000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reckpt.cli", "train", str(cfg)],
        env=child_env(OMP_NUM_THREADS="1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 30 "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saving step" in err
    path, step = reckpt.latest_checkpoint(str(run))
    assert path is not None and step >= 30 and reckpt.verify(path).ok
    assert f"{step:>8}  committed" in out  # the summary lists the preemption save


def test_resume_says_what_it_did(tmp_path: Path, data: Path) -> None:
    """--continue-train into an empty model_dir says it starts from scratch; a finished run
    resumed says there was nothing to train (not a final loss of nan). Every save and restore
    is a line (size, time, GB/s, tier) and a record of train_log.jsonl, which `reckpt plot` draws."""
    run = tmp_path / "typo"
    cfg = write_config(tmp_path / "a.toml", data, run, train="log_step_count_steps = 10")
    first = cli("train", cfg, "--continue-train")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"--continue-train: no checkpoint in model_dir {run} (it does not exist);" in first.stderr
    assert "training starts from scratch" in first.stderr
    # saves, evals and an ETA are shown without -v
    assert f"step {EVERY}: saved {run}/model.ckpt-{EVERY}; eval auc " in first.stderr
    assert " eta " in first.stderr
    for step in (EVERY, 2 * EVERY, STEPS - 1):
        assert re.search(
            rf"save {run}/model.ckpt-{step} \(full\): [\d.]+ KB in [\d.]+ s, [\d.e-]+ GB/s"
            r" \(sync\), tier disk",
            first.stderr,
        ), first.stderr[-3000:]
    again = cli("train", cfg, "--continue-train")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nothing to train: model_dir {run} is already at step {STEPS - 1}" in again.stderr
    assert "final train loss n/a (no step trained by this run)" in again.stdout and "nan" not in again.stdout
    assert re.search(
        rf"restore {run}/model.ckpt-{STEPS - 1}: [\d.]+ KB in [\d.]+ s, .* tier disk", again.stderr
    )

    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(0, STEPS, 10))
    saves = [r for r in records if r.get("event") == "save"]
    assert [r["step"] for r in saves] == [EVERY, 2 * EVERY, STEPS - 1]
    ckpt = run / f"model.ckpt-{STEPS - 1}"
    on_disk = sum(f["size"] for f in json.loads((ckpt / "reckpt.json").read_text())["files"].values())
    assert saves[-1]["bytes"] == on_disk and saves[-1]["tier"] == "disk" and saves[-1]["kind"] == "full"
    assert all(0 < r["stall_s"] <= r["seconds"] and r["gbps"] > 0 and r["async"] is False for r in saves)
    (restore,) = [r for r in records if r.get("event") == "restore"]
    assert restore["step"] == STEPS - 1 and restore["bytes"] == on_disk and restore["tier"] == "disk"
    assert [r["step"] for r in records if r.get("event") == "eval"] == [EVERY, 2 * EVERY, STEPS - 1]

    png = tmp_path / "run.png"
    proc = cli("plot", str(run), "-o", str(png), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["metric"] == "auc" and doc["steps"] == [EVERY, 2 * EVERY, STEPS - 1]
    assert doc["loss"]["steps"] == list(range(0, STEPS, 10))
    assert [(s["step"], s["bytes"]) for s in doc["saves"]][-1] == (STEPS - 1, on_disk)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_position_matches_relative_and_absolute_paths(tmp_path: Path, data: Path) -> None:
    """A run saved with absolute data paths resumes exactly with relative ones (same files);
    a position naming other files is refused instead of silently re-reading data."""
    import shutil

    straight = tmp_path / "straight"
    cfg = write_config(tmp_path / "a.toml", data, straight)
    assert cli("train", cfg).returncode == 0
    resumed = tmp_path / "resumed"
    abs_cfg = write_config(tmp_path / "b.toml", data, resumed)
    assert cli("train", abs_cfg, env={"RECKPT_TRAIN_KILL_AT_STEP": "45"}).returncode != 0
    rel = Path(os.path.relpath(data, tmp_path))
    rel_cfg = tmp_path / "c.toml"
    rel_cfg.write_text(Path(abs_cfg).read_text().replace(str(data), str(rel)))
    assert str(rel) in rel_cfg.read_text() and str(data) not in rel_cfg.read_text()
    proc = cli("train", str(rel_cfg), "--continue-train", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_state_dicts_equal(final_state(straight), final_state(resumed))

    other = tmp_path / "copy"
    shutil.copytree(data, other)
    moved = tmp_path / "moved"
    moved_cfg = write_config(tmp_path / "d.toml", data, moved)
    assert cli("train", moved_cfg, env={"RECKPT_TRAIN_KILL_AT_STEP": "25"}).returncode != 0
    elsewhere = tmp_path / "e.toml"
    elsewhere.write_text(Path(moved_cfg).read_text().replace(str(data), str(other)))
    proc = cli("train", str(elsewhere), "--continue-train")
    assert proc.returncode != 0
    assert "the saved data position names" in proc.stderr and "--fine-tune-checkpoint" in proc.stderr


def test_a_flipped_bit_in_the_newest_checkpoint_costs_no_good_checkpoint(tmp_path: Path, data: Path) -> None:
    """The newest checkpoint is damaged; --continue-train falls back to the previous one, marks
    the damaged one (ls shows it), redoes its step and retention keeps every good checkpoint."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.toml", data, run, train="keep_checkpoint_max = 2")
    assert cli("train", cfg).returncode == 0
    kept = [c.step for c in reckpt.list_checkpoints(str(run))]
    assert kept[-2:] == [40, STEPS - 1]
    flip_byte(next((run / f"model.ckpt-{STEPS - 1}" / "model").glob("*.distcp")))
    assert cli("verify", str(run)).returncode != 0
    ls = cli("ls", str(run)).stdout
    assert any(line.split()[:1] == [str(STEPS - 1)] and "damaged" in line for line in ls.splitlines()), ls
    proc = cli("train", cfg, "--continue-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {c.step: c.state for c in reckpt.list_checkpoints(str(run))}
    assert after == {s: "committed" for s in kept}, after  # the good ones, and the redone step
    assert all(reckpt.verify(str(run / f"model.ckpt-{s}")).ok for s in kept)


def test_throughput_after_a_resume_counts_only_this_runs_steps(tmp_path: Path, data: Path) -> None:
    import re

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.toml", data, run, train="log_step_count_steps = 1")
    assert cli("train", cfg, env={"RECKPT_TRAIN_KILL_AT_STEP": "45"}).returncode != 0
    proc = cli("train", cfg, "--continue-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    eps = {
        int(s): float(v.replace(",", ""))
        for s, v in re.findall(r"step (\d+) loss \S+ examples/s ([\d,.]+)", proc.stderr)
    }
    # Counting the 41 steps of the killed run as this run's would make the first rate ~40x too high.
    assert eps[41] < 4 * eps[STEPS - 1], eps
