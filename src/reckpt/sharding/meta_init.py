"""``init_parameters``: materialise a model built on the meta device before a restore.

Building a large model on ``torch.device("meta")`` costs no memory; before a restore (export,
serving) its tensors need real storage. This is TorchEasyRec's ``state_dict_util``
behaviour: parameters get uninitialised storage on ``device``, buffers get zeros, and a
module that had a meta parameter and defines ``reset_parameters`` is reset, so keys the
checkpoint lacks still hold initialised values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["init_parameters"]


def init_parameters(module: nn.Module, device: str | torch.device) -> list[str]:
    """Replace every meta-device parameter and buffer of ``module`` by a real tensor on ``device``.

    Submodules are visited children first. Parameters become ``torch.empty`` of the same
    shape and dtype (same ``requires_grad``), buffers ``torch.zeros``; then a submodule that
    had a meta parameter and defines ``reset_parameters()`` calls it. Tensors not on the meta
    device are left as they are.

    Args:
        module: the model (or any module) to materialise in place.
        device: where the new tensors go (``"cpu"``, ``"cuda:0"``, ...).

    Returns:
        The qualified names of the tensors that were replaced.

    Example:
        >>> with torch.device("meta"):
        ...     lin = nn.Linear(2, 3)
        >>> init_parameters(lin, "cpu")
        ['weight', 'bias']
        >>> lin.weight.is_meta
        False
    """
    target = torch.device(device)
    replaced: list[str] = []

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            visit(child, f"{prefix}{name}.")
        had_meta_param = False
        for name, param in list(mod.named_parameters(recurse=False)):
            if param is not None and param.is_meta:
                new: Any = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=target),
                    requires_grad=param.requires_grad,
                )
                setattr(mod, name, new)
                replaced.append(prefix + name)
                had_meta_param = True
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                persistent = name not in mod._non_persistent_buffers_set
                mod.register_buffer(
                    name, torch.zeros(buf.shape, dtype=buf.dtype, device=target), persistent=persistent
                )
                replaced.append(prefix + name)
        reset = getattr(mod, "reset_parameters", None)
        if had_meta_param and callable(reset):
            reset()

    visit(module, "")
    return replaced
