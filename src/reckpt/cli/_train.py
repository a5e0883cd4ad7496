"""Trainer commands: ``train``, ``eval``, ``export``, ``predict``, ``make-data``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["register", "flag"]


def flag(p: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """``--some-flag`` plus TorchEasyRec's ``--some_flag`` alias."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    p.add_argument(*names, **kw)


def _no_verify(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help=f"skip checking {whose} sizes and checksums (salvage only)",
    )


def register(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train the reference DLRM (no CONFIG: a demo on generated data)",
        epilog="example: reckpt train examples/demo.toml --model-dir runs/a --continue-train",
    )
    train.add_argument("config", nargs="?", help="TOML config (see examples/demo.toml)")
    flag(train, "model-dir", help="override model_dir")
    flag(train, "continue-train", action="store_true", help="resume from the latest checkpoint in model_dir")
    flag(train, "fine-tune-checkpoint", help="initialise from another run's model_dir or one checkpoint")
    flag(train, "fine-tune-ckpt-param-map", help="parameter-map file for the fine-tune")
    flag(train, "ignore-restore-optimizer", action="store_true", help="restore weights only")
    train.set_defaults(func=_run)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (AUC, log-loss)",
        epilog="example: reckpt eval examples/demo.toml --checkpoint-path runs/a/model.ckpt-500",
    )
    ev.add_argument("config", nargs="?", help="TOML config (default: the demo's, as for `reckpt train`)")
    flag(ev, "model-dir")
    flag(ev, "checkpoint-path", help="a checkpoint or model_dir (default: latest in model_dir)")
    _no_verify(ev, "the checkpoint's")
    ev.set_defaults(func=_run)

    ex = sub.add_parser(
        "export",
        help="export the best or latest checkpoint for serving",
        epilog="example: reckpt export examples/demo.toml --export-dir serving/",
    )
    ex.add_argument("config", nargs="?", help="TOML config (default: the demo's, as for `reckpt train`)")
    flag(ex, "model-dir")
    flag(ex, "export-dir", required=True)
    flag(ex, "checkpoint-path")
    ex.add_argument(
        "--quantize",
        choices=["raw", "int8", "fp16"],
        default="raw",
        help="embedding tables: raw (lossless), int8 (row-wise, fp16 scale+offset) or fp16",
    )
    _no_verify(ex, "the checkpoint's")
    ex.set_defaults(func=_run)

    pr = sub.add_parser(
        "predict",
        help="score a Parquet file with an exported model",
        epilog="example: reckpt predict --export-dir serving/ --input data/eval --output s.parquet",
    )
    flag(pr, "export-dir", required=True)
    pr.add_argument("--input", required=True, help="Parquet file or directory")
    pr.add_argument("--output", required=True, help="Parquet file to write (column 'score')")
    _no_verify(pr, "the export's")
    pr.set_defaults(func=_run)

    md = sub.add_parser(
        "make-data",
        help="write a synthetic click log (Zipf ids, planted signal)",
        epilog="example: reckpt make-data --out demo_data",
    )
    md.add_argument("--out", required=True)
    md.add_argument("--rows", type=int, default=200000)
    md.add_argument("--eval-rows", type=int, default=10000)
    md.add_argument("--seed", type=int, default=0)
    md.set_defaults(func=_run)


def _config(args: argparse.Namespace) -> Any:
    from reckpt.trainer.config import load_config

    overrides: dict[str, Any] = {}
    if getattr(args, "model_dir", None):
        overrides["model_dir"] = args.model_dir
    if getattr(args, "fine_tune_checkpoint", None):
        overrides["train_config.fine_tune_checkpoint"] = args.fine_tune_checkpoint
    if getattr(args, "fine_tune_ckpt_param_map", None):
        overrides["train_config.fine_tune_ckpt_param_map"] = args.fine_tune_ckpt_param_map
    cfg = load_config(args.config, overrides)
    return cfg.validate(args.config or "<command line>")


def _demo_config(args: argparse.Namespace) -> Any:
    from reckpt.trainer.config import load_config
    from reckpt.trainer.data import make_data

    model_dir = args.model_dir or "model_dir"
    data_dir = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "demo_data")
    cfg = load_config(None, {"model_dir": model_dir})
    if os.path.isdir(os.path.join(data_dir, "train")):
        cfg.data = _demo_data(data_dir)
    else:
        print(f"generating demo data in {data_dir}", file=sys.stderr)
        cfg.data = make_data(data_dir)
    cfg.model.num_embeddings = 2000
    t = cfg.train_config
    t.num_steps, t.save_checkpoints_steps, t.keep_checkpoint_max = 3000, 500, 3
    t.log_step_count_steps, t.learning_rate, t.sparse_learning_rate = 100, 0.001, 0.02
    cfg.export_config.exporter_type = "best"
    if getattr(args, "fine_tune_checkpoint", None):
        t.fine_tune_checkpoint = args.fine_tune_checkpoint
    return cfg.validate("<demo>")


def _demo_data(data_dir: str) -> Any:
    """The demo data's config; its history column ``h0`` only if the data has it (older demo
    data, written before the sequence feature existed, trains without it)."""
    import glob

    import pyarrow.parquet as pq

    from reckpt.trainer.config import DataConfig

    train = os.path.join(data_dir, "train")
    first = sorted(glob.glob(os.path.join(train, "*.parquet")))[:1]
    names = set(pq.ParquetFile(first[0]).schema_arrow.names) if first else set()
    return DataConfig(
        train_input_path=train,
        eval_input_path=os.path.join(data_dir, "eval"),
        dense_columns=[f"d{j}" for j in range(4)],
        sparse_columns=[f"s{j}" for j in range(3)],
        sequence_columns=["h0"] if "h0" in names else [],
    )


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-data":
        from reckpt.trainer.data import make_data

        make_data(args.out, rows=args.rows, eval_rows=args.eval_rows, seed=args.seed)
        print(f"wrote {args.out}/train and {args.out}/eval")
        return 0
    if args.command == "predict":
        from reckpt.trainer.serve import predict

        scores = predict(args.export_dir, args.input, args.output, verify=args.verify)
        print(f"scored {scores.numel()} rows into {args.output}")
        return 0
    cfg = _config(args) if getattr(args, "config", None) else _demo_config(args)
    if args.command == "train":
        from reckpt.trainer.train import train_and_evaluate

        train_and_evaluate(
            cfg, continue_train=args.continue_train, ignore_restore_optimizer=args.ignore_restore_optimizer
        )
    elif args.command == "eval":
        from reckpt.trainer.serve import eval_checkpoint

        print(eval_checkpoint(cfg, args.checkpoint_path, verify=args.verify))
    elif args.command == "export":
        from reckpt.trainer.serve import export_model

        src = export_model(cfg, args.export_dir, args.checkpoint_path, args.quantize, verify=args.verify)
        print(f"exported {src} to {args.export_dir}")
    return 0
