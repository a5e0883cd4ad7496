"""The ``reckpt`` command line (argparse; flags use hyphens, TorchEasyRec's underscores are aliases).

Examples:
    reckpt train                                  # demo: generate data, train into ./model_dir
    reckpt train demo.toml --model-dir runs/a --continue-train
    torchrun --nproc_per_node=2 -m reckpt.cli train demo.toml
    reckpt eval demo.toml --checkpoint-path runs/a/model.ckpt-400
    reckpt export demo.toml --export-dir serving/
    reckpt predict --export-dir serving/ --input data/eval --output scores.parquet
    reckpt make-data --out data/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from reckpt.errors import CheckpointError

__all__ = ["main"]


def _flag(p: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """``--some-flag`` plus TorchEasyRec's ``--some_flag`` alias."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    p.add_argument(*names, **kw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reckpt",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the reference DLRM (no CONFIG: a demo on generated data)")
    train.add_argument("config", nargs="?", help="TOML config (see examples/demo.toml)")
    _flag(train, "model-dir", help="override model_dir")
    _flag(train, "continue-train", action="store_true", help="resume from the latest checkpoint in model_dir")
    _flag(train, "fine-tune-checkpoint", help="initialise from another run's model_dir or one checkpoint")
    _flag(train, "fine-tune-ckpt-param-map", help="parameter-map file for the fine-tune")
    _flag(train, "ignore-restore-optimizer", action="store_true", help="restore weights only")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (AUC, log-loss)")
    ev.add_argument("config")
    _flag(ev, "model-dir")
    _flag(ev, "checkpoint-path", help="a checkpoint or model_dir (default: latest in model_dir)")

    ex = sub.add_parser("export", help="export the best or latest checkpoint for serving")
    ex.add_argument("config")
    _flag(ex, "model-dir")
    _flag(ex, "export-dir", required=True)
    _flag(ex, "checkpoint-path")

    pr = sub.add_parser("predict", help="score a Parquet file with an exported model")
    _flag(pr, "export-dir", required=True)
    pr.add_argument("--input", required=True, help="Parquet file or directory")
    pr.add_argument("--output", required=True, help="Parquet file to write (column 'score')")

    md = sub.add_parser("make-data", help="write a synthetic click log (Zipf ids, planted signal)")
    md.add_argument("--out", required=True)
    md.add_argument("--rows", type=int, default=200000)
    md.add_argument("--eval-rows", type=int, default=10000)
    md.add_argument("--seed", type=int, default=0)
    return parser


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
    if not os.path.isdir(os.path.join(data_dir, "train")):
        print(f"generating demo data in {data_dir}", file=sys.stderr)
    cfg.data = (
        make_data(data_dir) if not os.path.isdir(os.path.join(data_dir, "train")) else _demo_data(data_dir)
    )
    cfg.model.num_embeddings = 2000
    t = cfg.train_config
    t.num_steps, t.save_checkpoints_steps, t.keep_checkpoint_max = 3000, 500, 3
    t.log_step_count_steps, t.learning_rate, t.sparse_learning_rate = 100, 0.001, 0.02
    cfg.export_config.exporter_type = "best"
    if args.fine_tune_checkpoint:
        t.fine_tune_checkpoint = args.fine_tune_checkpoint
    return cfg.validate("<demo>")


def _demo_data(data_dir: str) -> Any:
    from reckpt.trainer.config import DataConfig

    return DataConfig(
        train_input_path=os.path.join(data_dir, "train"),
        eval_input_path=os.path.join(data_dir, "eval"),
        dense_columns=[f"d{j}" for j in range(4)],
        sparse_columns=[f"s{j}" for j in range(3)],
    )


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-data":
        from reckpt.trainer.data import make_data

        make_data(args.out, rows=args.rows, eval_rows=args.eval_rows, seed=args.seed)
        print(f"wrote {args.out}/train and {args.out}/eval")
        return 0
    if args.command == "predict":
        from reckpt.trainer.serve import predict

        scores = predict(args.export_dir, args.input, args.output)
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

        print(eval_checkpoint(cfg, args.checkpoint_path))
    elif args.command == "export":
        from reckpt.trainer.serve import export_model

        src = export_model(cfg, args.export_dir, args.checkpoint_path)
        print(f"exported {src} to {args.export_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("torchrec", "torch", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    try:
        return _run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"reckpt {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
