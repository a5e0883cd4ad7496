"""Optimizer state: name-keyed layout, state initialisation without data, and loading.

``torch.optim`` keys per-parameter state by position (``state.0.exp_avg``), which breaks
as soon as the model gains or loses a parameter. reckpt writes it keyed by parameter
name (``state.<fqn>.exp_avg``, the layout TorchRec's ``KeyedOptimizer`` already uses)
and reads both. Dense optimizer state only exists after a first ``step()``; instead of
TorchEasyRec's dummy training step on real data, :func:`init_optimizer_state` runs one
step with zero gradients and a learning rate of 0, which creates the state without
consuming data or changing a weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from reckpt.errors import ConfigError

__all__ = [
    "is_keyed_optimizer",
    "optimizer_param_names",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "init_optimizer_state",
    "is_index_keyed",
]

_INDEX_KEY = re.compile(r"state\.(0|[1-9][0-9]*)\..+")


def is_keyed_optimizer(optimizer: Any) -> bool:
    """TorchRec ``KeyedOptimizer`` (and friends): state already keyed by parameter name."""
    return isinstance(getattr(optimizer, "params", None), Mapping)


def is_index_keyed(checkpoint_keys: list[str] | Any) -> bool:
    """Whether a checkpoint's optimizer keys use torch.optim's positional layout."""
    return any(_INDEX_KEY.fullmatch(k) for k in checkpoint_keys)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name of each optimizer parameter, in ``state_dict()`` index order.

    Raises:
        ConfigError: the optimizer holds a parameter the model does not have.
    """
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                raise ConfigError(
                    f"optimizer param_groups[{gi}] holds a parameter of shape {tuple(p.shape)} that"
                    " is not a parameter of the model passed alongside it; pass the model whose"
                    " parameters the optimizer was built from"
                )
            names.append(name)
    return names


def optimizer_state_dict(model: torch.nn.Module, optimizer: Any, layout: str = "name") -> dict[str, Any]:
    """The optimizer's state dict in the requested layout.

    Args:
        layout: ``"name"`` (reckpt's default, robust to model changes) or ``"index"``
            (``torch.optim``'s own, as TorchEasyRec writes it, for its readers).
    """
    if layout not in ("name", "index"):
        raise ConfigError(f"optimizer layout must be 'name' or 'index', got {layout!r}")
    sd: dict[str, Any] = optimizer.state_dict()
    if is_keyed_optimizer(optimizer) or layout == "index":
        return sd
    names = optimizer_param_names(model, optimizer)
    return {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]],
    }


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: Any, sd: dict[str, Any]) -> None:
    """Apply a name-keyed state dict (as built by :func:`optimizer_state_dict`)."""
    if is_keyed_optimizer(optimizer):
        optimizer.load_state_dict(sd)
        return
    index = {n: i for i, n in enumerate(optimizer_param_names(model, optimizer))}
    current = optimizer.state_dict()
    state = {index[n]: v for n, v in sd["state"].items() if n in index}
    groups = []
    for cur, loaded in zip(current["param_groups"], sd["param_groups"], strict=False):
        groups.append({**loaded, "params": cur["params"]})
    groups.extend(current["param_groups"][len(groups) :])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@torch.no_grad()
def _zero_lr_step(optimizer: torch.optim.Optimizer) -> None:
    saved_grads = {}
    saved_lrs = []
    for group in optimizer.param_groups:
        saved_lrs.append(group["lr"])
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
        for p in group["params"]:
            if p.requires_grad:
                saved_grads[p] = p.grad
                p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, saved_lrs, strict=True):
            group["lr"] = lr
        for p, g in saved_grads.items():
            p.grad = g


def init_optimizer_state(optimizer: Any) -> list[Any]:
    """Create lazily-initialised optimizer state without data; returns the params it created.

    Only an optimizer with no state at all is touched (a partially stepped optimizer is
    left as is). TorchRec keyed optimizers use their own ``init_state()``.
    """
    if is_keyed_optimizer(optimizer):
        # TorchRec: fused (in-backward) optimizers hold their state from sharding time; dense
        # parts are KeyedOptimizerWrappers around a torch optimizer whose state is lazy.
        subs = getattr(optimizer, "optimizers", None)
        for keyed in [o for _, o in subs] if subs else [optimizer]:
            inner = getattr(keyed, "_optimizer", None)
            if isinstance(inner, torch.optim.Optimizer) and not inner.state:
                _zero_lr_step(inner)
        return []
    if optimizer.state:
        return []
    _zero_lr_step(optimizer)
    return [p for p in optimizer.state]
