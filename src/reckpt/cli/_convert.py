"""``reckpt convert``: a checkpoint to one unsharded safetensors or torch.save file, and back.

Checkpoint -> file streams: one tensor is read at a time. safetensors is written directly
(header first, then each tensor's bytes); a torch.save file is written from that
safetensors file memory-mapped, so resident memory stays about one tensor either way.
File -> checkpoint loads the file (``torch.load(weights_only=True)`` or safetensors) and
saves it as the ``model`` part of a new, committed checkpoint.

The output file replaces nothing it did not write: an existing file is refused unless
``--overwrite`` is given, and the file appears only when complete (written to a temporary
sibling and renamed; on an object store, uploaded in one piece), so an interrupted convert
leaves the previous file, or none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

from reckpt.cli._output import progress

__all__ = ["register", "to_safetensors"]

_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def to_safetensors(checkpoint: str, part: str, out_path: str) -> int:
    """Stream ``part`` of a checkpoint into one unsharded safetensors file; returns tensors written.

    Reads without checking checksums: the caller verifies the checkpoint once first.
    """
    from reckpt.errors import ConfigError
    from reckpt.restore.inspection import inspect_checkpoint, read_part

    entries = [e for e in inspect_checkpoint(checkpoint).parts.get(part, []) if e.shape is not None]
    if not entries:
        raise ConfigError(f"{checkpoint}: no tensors in part {part!r}")
    header: dict[str, Any] = {"__metadata__": {"source": checkpoint, "part": part}}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise ConfigError(f"{checkpoint}: {e.name} has dtype {e.dtype}, which safetensors cannot store")
        header[e.name] = {
            "dtype": _ST_DTYPES[e.dtype],
            "shape": e.shape,
            "data_offsets": [offset, offset + e.bytes],
        }
        offset += e.bytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out_path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in progress(entries, "convert"):
            tensor = read_part(checkpoint, part, [e.name], verify=False)[e.name].contiguous()
            f.write(
                tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                if tensor.numel()
                else b""
            )
    return len(entries)


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _to_torch_save(checkpoint: str, part: str, out_path: str) -> int:
    import mmap

    import torch

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        st_path = os.path.join(tmp, "stream.safetensors")
        n = to_safetensors(checkpoint, part, st_path)
        with open(st_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            (hlen,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + hlen])
            header.pop("__metadata__", None)
            base = 8 + hlen
            # Zero-copy views of the file's pages: torch.save streams them without a second copy.
            views = {}
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for name, h in header.items():
                dtype = getattr(torch, _TORCH_DTYPES[h["dtype"]])
                start, end = h["data_offsets"]
                count = (end - start) // dtype.itemsize
                flat = (
                    torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
                    if count
                    else torch.empty(0, dtype=dtype)
                )
                views[name] = flat.view(h["shape"])
            torch.save(views, out_path)
            del views
    return n


def _from_file(src: str, dst: str) -> int:
    import torch

    from reckpt.errors import ConfigError
    from reckpt.save.engine import save_parts

    if src.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(src)
    else:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{src}: expected a flat state dict of tensors")
    save_parts(dst, [("model", sd)], user_metadata={"converted_from": src})
    return len(sd)


@contextlib.contextmanager
def output_file(dst: str, overwrite: bool) -> Iterator[str]:
    """Yield a local path to write ``dst``'s content into; ``dst`` appears only on success.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is off (checked before any work).
        IsADirectoryError: ``dst`` is a directory.
    """
    from reckpt.errors import ConfigError
    from reckpt.storage.core import Storage, storage_for

    st = storage_for(dst)
    if st.isdir(dst):
        raise ConfigError(f"{dst}: is a directory; give the output file's path (model.safetensors ...)")
    if st.exists(dst) and not overwrite:
        raise FileExistsError(
            f"{dst}: already exists; pass --overwrite to replace it, or choose another path"
        )
    local_dir = os.path.dirname(os.path.abspath(dst)) if st.local else None
    if local_dir is not None:
        os.makedirs(local_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local_dir, prefix=".reckpt-convert.") as tmp:
        path = os.path.join(tmp, f"out-{uuid.uuid4().hex[:8]}")
        yield path
        if st.local:
            os.replace(path, st._local(dst))
            st.fsync_dir(Storage.parent(dst))
        else:
            st.fs.put_file(path, dst)


def verified(checkpoint: str, action: str = "convert") -> None:
    """Check a checkpoint's sizes and checksums before its values are used (``action``: the verb).

    Raises:
        IntegrityError: a file is missing, truncated or corrupted (the problems are listed).
    """
    from reckpt.format.verification import integrity_error, verify

    report = verify(checkpoint)
    if report.problems:
        raise integrity_error(
            checkpoint,
            report.problems,
            f"Refusing to {action} a damaged checkpoint: use another one, or pass --no-verify to"
            " salvage what is readable.",
        )


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    if os.path.isfile(src):
        n = _from_file(src, dst)
        print(f"wrote checkpoint {dst} ({n} tensors)")
        return 0
    fmt = args.format or ("safetensors" if dst.endswith(".safetensors") else "torch")
    convert = to_safetensors if fmt == "safetensors" else _to_torch_save
    with output_file(dst, args.overwrite) as out:
        if args.verify:
            verified(src)
        n = convert(src, args.part, out)
    print(f"wrote {dst} ({fmt}, {n} tensors)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="checkpoint -> unsharded safetensors / torch.save file, or such a file -> checkpoint",
        epilog="examples: reckpt convert runs/a/model.ckpt-500 model.safetensors;"
        " reckpt convert weights.pt runs/b/model.ckpt-0",
    )
    p.add_argument("src", help="a checkpoint directory, or a .safetensors / torch.save file")
    p.add_argument("dst", help="the output file, or the checkpoint directory to create")
    p.add_argument("--part", default="model", help="which part of the checkpoint (model, optimizer, ...)")
    p.add_argument("--format", choices=["safetensors", "torch"], help="default: from the output's extension")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the checkpoint's sizes and checksums first (salvage only)",
    )
    p.set_defaults(func=cmd_convert)
