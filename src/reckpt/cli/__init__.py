"""The ``reckpt`` command line: checkpoint tools and the reference trainer.

Every command takes local paths and URLs (``s3://...``), exits non-zero with a one-line
error on failure, and prints machine-readable output with ``--json`` where noted
(schemas: ``docs/cli.md``). Flags use hyphens; TorchEasyRec's underscore spellings are
accepted as aliases. torch and torchrec are imported only by the commands that need them.

Examples:
    reckpt ls runs/a                          # checkpoints, state, size, metrics, markers
    reckpt inspect runs/a/model.ckpt-500      # entries by part, with sharding
    reckpt verify runs/a                      # sizes and checksums of every checkpoint
    reckpt diff runs/a/model.ckpt-500 runs/a/model.ckpt-1000
    reckpt best runs/a --metric auc
    reckpt prune runs/a --keep-last 2 --keep-best auc --dry-run
    reckpt convert runs/a/model.ckpt-500 model.safetensors
    reckpt plot runs/a -o metrics.png
    reckpt train                              # demo: generate data, train into ./model_dir
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from reckpt.cli import _checkpoints, _convert, _train

    doc = __doc__.replace("``", "")  # the module docstring's RST markup is not for a terminal
    parser = argparse.ArgumentParser(
        prog="reckpt",
        description=doc.split("Examples:")[0].strip(),
        epilog="examples:" + doc.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _checkpoints.register(sub)
    _convert.register(sub)
    _train.register(sub)
    for action in sub._choices_actions:  # each command's --help opens with its one-line help
        command = sub.choices[action.dest]
        if not command.description and action.help:
            command.description = action.help[:1].upper() + action.help[1:] + "."
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("torchrec", "torch", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    from reckpt.errors import CheckpointError

    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``reckpt ls | head``): not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[0] if lines else type(e).__name__
        if len(lines) > 1:  # one line for scripts, nothing dropped for people
            message += " (" + "; ".join(lines[1:]) + ")"
        print(f"reckpt {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
