"""The `model.pth` format, in one place: load (memory-mapped), validate, save atomically, read one layer.

A checkpoint is one torch.save'd dict that describes itself, quantized files too:

    {"model_args": ModelArgs.to_dict(), "quantization": None | {"mode", "groupsize", "layers", ...},
     "state_dict": {name: tensor}}

Tokenizer files sit next to it. The converter writes float files, quantize.py quantized ones; every reader
(generate, eval, quantize, tp, scripts) goes through `load`, which names a truncated, foreign or incomplete
file as such. Writes go to a temporary name, are fsync'ed and renamed (`atomic_output`): a full disk, a crash
or Ctrl-C never leaves a half-written file under the final name.
"""
import contextlib
import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from cli import UsageError
from model import ModelArgs, Transformer

FORMAT_KEYS = ("model_args", "quantization", "state_dict")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
CONVERT_HINT = "convert the model again with convert_hf_checkpoint.py (or quantize.py for a quantized file)"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used as it is: one line, exit code 2."""


@dataclass
class Checkpoint:
    path: Path
    args: ModelArgs
    quantization: Optional[dict]
    state_dict: dict  # name -> tensor, memory-mapped: pages are read when a tensor is used


def load_mapped(path):
    """torch.load(mmap=True): a private mapping, or, for a file larger than the kernel lets a private mapping be
    (its overcommit check counts it as memory that could be written: a file larger than RAM), a shared one.
    Nothing here writes to the weights, so the file is never changed through it."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "Cannot allocate memory" not in str(error):
            raise
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def load(path) -> Checkpoint:
    """Open a checkpoint without reading its tensors (mmap), checking that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; create it with scripts/prepare.sh or convert_hf_checkpoint.py")
    with open(path, "rb") as file:
        head = file.read(4)
    try:
        raw = load_mapped(path)
    except Exception as error:  # zip, pickle and mmap readers each raise their own kinds
        if head == ZIP_MAGIC:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
            raise CheckpointError(f"{path} is truncated or corrupt ({reason}); {CONVERT_HINT}") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not start as torch.save's files do); "
                              f"{CONVERT_HINT}") from None
    if not isinstance(raw, dict) or any(key not in raw for key in FORMAT_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint written by convert_hf_checkpoint.py "
                              f"(it lacks {', '.join(FORMAT_KEYS)}); convert the model with it first")
    try:
        args = ModelArgs.from_dict(raw["model_args"])
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path} has invalid model_args ({error}); {CONVERT_HINT}") from None
    state_dict, quantization = raw["state_dict"], raw["quantization"]
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} has a state_dict that is not a dict of tensors; {CONVERT_HINT}")
    if quantization is not None and not (isinstance(quantization, dict) and isinstance(quantization.get("layers"), dict)
                                         and quantization.get("mode") in ("int8", "int4", "int4-gptq")):
        raise CheckpointError(f"{path} has an invalid quantization record; {CONVERT_HINT}")
    return Checkpoint(path, args, quantization, state_dict)


def check_tensors(state_dict: dict, expected: dict, source, optional=()):
    """Every tensor `expected` names (a meta model's state_dict) must be in `state_dict` with its shape and
    kind (floating point, or the exact integer dtype of quantized values); nothing else may be."""
    missing = sorted(set(expected) - set(state_dict) - set(optional))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model's config implies, e.g. {missing[0]!r}: "
                              f"it is incomplete; {CONVERT_HINT}")
    for name, tensor in state_dict.items():
        if name not in expected:
            raise CheckpointError(f"{source} holds {name!r}, which does not belong to the model its config describes; "
                                  f"{CONVERT_HINT}")
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: {name!r} has shape {tuple(tensor.shape)} but the config implies "
                                  f"{tuple(want.shape)}; {CONVERT_HINT}")
        if tensor.is_floating_point() != want.is_floating_point() or (not want.is_floating_point() and tensor.dtype != want.dtype):
            raise CheckpointError(f"{source}: {name!r} is {tensor.dtype} where the model needs "
                                  f"{'a floating point type' if want.is_floating_point() else want.dtype}; {CONVERT_HINT}")


def load_into(model: Transformer, checkpoint: Checkpoint):
    """Validate, then assign the memory-mapped tensors to a model built on the meta device (with any quantized
    modules already swapped in): no second copy of the weights is made."""
    tied = checkpoint.args.tie_word_embeddings and type(model.output) is nn.Linear
    check_tensors(checkpoint.state_dict, model.state_dict(), checkpoint.path, optional={"output.weight"} if tied else ())
    model.load_state_dict(checkpoint.state_dict, assign=True, strict=not tied)
    model.tie_weights()


def read_layer(checkpoint: Checkpoint, index: int) -> dict:
    """Layer `index`'s tensors ({"attention.wqkv.weight": ...}), copied out of the mapping: only their pages of
    the file are read, whatever the model's size (what streaming a model layer by layer needs)."""
    if not 0 <= index < checkpoint.args.n_layer:
        raise IndexError(f"layer {index} of a {checkpoint.args.n_layer}-layer model")
    prefix = f"layers.{index}."
    return {name[len(prefix):]: tensor.clone() for name, tensor in checkpoint.state_dict.items() if name.startswith(prefix)}


def mapping_start(path: Path, tensor: torch.Tensor) -> int:
    """The address at which torch.load(mmap=True) mapped `path` (the mapping that holds `tensor`): a tensor's
    offset in the file is its address minus this (how streaming.py and save_generated find a tensor's bytes)."""
    real, address = os.path.realpath(path), tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= address < high:
                    return low - int(fields[2], 16)
    raise CheckpointError(f"{path} is not memory-mapped as torch.load(mmap=True) maps it; this needs Linux and a "
                          "checkpoint written by torch.save")


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path to write; on success it is fsync'ed and renamed to `path`. On any failure
    (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"{path.parent} is a file, not a folder; choose another output folder")
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except OSError as error:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        raise CheckpointError(f"could not write {path}: {'no space left on the device, ' if full else ''}"
                              f"{error.strerror or error}; nothing was written: free some space or choose another "
                              "folder") from None
    finally:
        tmp.unlink(missing_ok=True)


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch.save reports a full disk as a
    RuntimeError about zip positions, and the real reason is what the user needs to see."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def save_generated(path, args: ModelArgs, shapes: dict, fill, quantization: Optional[dict] = None, progress=None):
    """Write a checkpoint larger than memory: `shapes` {name: (shape, dtype)}, each tensor made by `fill(name)`
    only when its bytes are written, one at a time. torch.save lays the file out without the tensors' bytes
    (skip_data: its tensors are allocated but never touched, so they take no memory), then each tensor is
    written into its place. Atomic, as save."""
    placeholders = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    with atomic_output(path) as tmp:
        with torch.serialization.skip_data():
            torch.save({"model_args": args.to_dict(), "quantization": quantization, "state_dict": placeholders}, tmp)
        del placeholders
        mapped = load_mapped(tmp)["state_dict"]
        base = mapping_start(tmp, next(iter(mapped.values())))
        offsets = {name: tensor.data_ptr() - base for name, tensor in mapped.items()}
        del mapped
        descriptor = os.open(tmp, os.O_WRONLY)
        try:
            for name in (progress or (lambda names: names))(list(shapes)):
                tensor = fill(name).contiguous()
                if (tuple(tensor.shape), tensor.dtype) != (tuple(shapes[name][0]), shapes[name][1]):
                    raise ValueError(f"fill({name!r}) made {tuple(tensor.shape)} {tensor.dtype}, not {shapes[name]}")
                data = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                written = 0
                while written < len(data):
                    written += os.pwrite(descriptor, data[written:], offsets[name] + written)
        finally:
            os.close(descriptor)


def save(path, args: ModelArgs, state_dict: dict, quantization: Optional[dict] = None):
    """Write a checkpoint atomically (see atomic_output)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as file:
        writer = _RecordingWriter(file)
        try:
            torch.save({"model_args": args.to_dict(), "quantization": quantization, "state_dict": state_dict}, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
