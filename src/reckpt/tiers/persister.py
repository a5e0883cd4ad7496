"""The persister: one process per node that promotes checkpoints to the slower tiers.

Started by the trainer of each node (``python -m reckpt.tiers.persister --detach <control>``,
see :meth:`reckpt.tiers.control.Control.start_persister`) as a detached process of its own
session: a SIGKILL of the trainer, or of the trainer's whole process group, leaves it
running, and it finishes promoting the last committed checkpoint. It works through the
requests of its node's control folder (:mod:`reckpt.tiers.control`), oldest step first:

1. the source (the tier the trainer saved into) not committed yet: wait while the trainer
   that wrote the request lives (the save is under way); drop the request once that trainer
   is gone or replaced (the save never commits);
2. committed: copy it to each target tier in turn (:mod:`reckpt.tiers.promote`), then
   remove the request. A failure is retried with a growing pause, and dropped after
   :data:`MAX_ATTEMPTS` with an error in the log.

Nothing else is remembered: a persister that is killed and started again finds the same
requests and the same tiers, and promotion is idempotent. It exits once its trainer is gone
(or closed its manager) and no request is left. At most one runs per node (a lock).
Retention is not its business: the trainer prunes each tier (:mod:`reckpt.lifecycle.tiered`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from reckpt.commit.state import checkpoint_state
from reckpt.naming import MANIFEST_FILE, parse_step
from reckpt.storage.core import Storage, storage_for
from reckpt.tiers.config import Tier, TierSet
from reckpt.tiers.control import LOCK_HELD_EXIT, Control, Request
from reckpt.tiers.promote import commit_shared, contribute_shared, copy_checkpoint

__all__ = ["Persister", "main", "MAX_ATTEMPTS"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
_POLL_S = 0.05
_SHARE_TIMEOUT_S = 900.0


class Persister:
    """Works through one node's promotion requests (see the module doc).

    Args:
        control: the node's control folder.
    """

    def __init__(self, control: Control) -> None:
        self.control = control
        self._storages: dict[str, Storage] = {}
        self._not_before: dict[int, float] = {}

    def _storage(self, tier: Tier) -> Storage:
        if tier.url not in self._storages:
            self._storages[tier.url] = storage_for(tier.url, tier.storage_options)
        return self._storages[tier.url]

    def run(self) -> None:
        """Promote until the trainer is gone and nothing is pending."""
        logger.info("persister %d started for %s", os.getpid(), self.control.path)
        while True:
            config = self.control.config()
            poll = float(config.get("poll_s", _POLL_S))
            pending = self.control.pending()
            for request in pending:
                if not self.handle(request, config):
                    break  # keep the order: a later step waits for an earlier one
            if not pending and not self.control.trainer_alive():
                logger.info("persister %d: the trainer is gone and nothing is pending; exiting", os.getpid())
                return
            time.sleep(poll)

    def handle(self, request: Request, config: Mapping[str, Any]) -> bool:
        """Work on one request; returns whether it is finished (done or dropped)."""
        if time.monotonic() < self._not_before.get(request.step, 0.0):
            return False
        tiers = TierSet.from_json(config["tiers"])
        source = tiers[request.source]
        src = self._storage(source)
        src_path = source.checkpoint_dir(request.step)
        if checkpoint_state(src, src_path) != "committed":
            if self.control.trainer_alive(request.pid):
                return False  # the save is under way
            logger.warning("%s was never committed and its trainer is gone: nothing to promote", src_path)
            self.control.remove(request.step)
            return True
        try:
            manifest = src.read_bytes(Storage.join(src_path, MANIFEST_FILE))
            for name in request.targets:
                self.promote(src, src_path, manifest, tiers[name], config)
        except Exception as e:
            attempts = request.attempts + 1
            if attempts >= MAX_ATTEMPTS:
                logger.error("promoting step %d failed %d times, giving up: %s", request.step, attempts, e)
                self.control.remove(request.step)
                return True
            pause = min(30.0, 0.5 * 2**attempts)
            logger.warning(
                "promoting step %d failed (attempt %d), retrying in %.1fs: %s",
                request.step,
                attempts,
                pause,
                e,
            )
            self.control.update(dataclasses.replace(request, attempts=attempts))
            self._not_before[request.step] = time.monotonic() + pause
            return False
        self.control.remove(request.step)
        self._not_before.pop(request.step, None)
        return True

    def promote(
        self, src: Storage, src_path: str, manifest: bytes, tier: Tier, config: Mapping[str, Any]
    ) -> None:
        """Copy one committed checkpoint to ``tier`` (this node's part of it, on many nodes)."""
        nodes, node = int(config.get("nodes", 1)), int(config.get("node", 0))
        step_dir = tier.checkpoint_dir(_step_of(src_path))
        dst = self._storage(tier)
        if nodes == 1 or not tier.is_shared:
            copy_checkpoint(src, src_path, manifest, dst, step_dir, complete=nodes == 1)
            return
        timeout = float(config.get("share_timeout_s", _SHARE_TIMEOUT_S))
        if node == 0:
            commit_shared(src, src_path, manifest, dst, step_dir, timeout_s=timeout)
        else:
            contribute_shared(src, src_path, manifest, dst, step_dir, timeout_s=timeout)


def _step_of(path: str) -> int:
    step = parse_step(path)
    if step is None:
        raise ValueError(f"{path}: not a model.ckpt-<step> directory")
    return step


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reckpt.tiers.persister [--detach] CONTROL_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m reckpt.tiers.persister", description=__doc__)
    parser.add_argument("--detach", action="store_true", help="fork; the parent returns at once")
    parser.add_argument("control_dir")
    args = parser.parse_args(argv)
    notify: int | None = None
    if args.detach:  # the trainer's child returns once the persister has its lock, or lost it
        ready, notify = os.pipe()
        if os.fork() > 0:
            os.close(notify)
            os._exit(0 if os.read(ready, 1) == b"1" else LOCK_HELD_EXIT)
        os.close(ready)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    control = Control(args.control_dir)
    with control.persister_lock() as got:
        if notify is not None:
            os.write(notify, b"1" if got else b"0")
            os.close(notify)
        if not got:
            logger.info("another persister holds %s; exiting", args.control_dir)
            return 0
        Persister(control).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
