"""Models larger than memory: the transformer's layers streamed from disk each forward, under a memory budget.

    python generate.py --memory_budget 2GB --checkpoint_path checkpoints/BIG/model.pth --prompt "..."

load_model(..., memory_budget=B) builds the model on the meta device and prepares one *unit* at a time (a
transformer block, the output projection) in the layout its kernels read: its dtype, its packed quantized
weights. A unit whose prepared tensors are the checkpoint's own bytes (a float checkpoint run in its dtype) is
read from the checkpoint itself; any other is written once to a stream file next to the checkpoint
(`streamed/<stem>.<digest>.bin`), each unit one contiguous range. Nothing of the checkpoint's mapping is
touched: every read is a pread into memory this process owns, so what it holds is what the budget counts.

At the first forward (after setup_caches, so the KV cache is known) the budget is split: the KV cache, the
final norm and the ring of slots the streamed units pass through (two when they fit: one computed while the
next is read by a reader thread) come first; the units that fit beside them stay resident for the whole run,
largest first (the output projection, then blocks). Every other unit is read into a free slot once per forward,
in forward order, the next ones read ahead while the current one computes, so a token costs (model bytes -
resident bytes) / read bandwidth. The reader drops the page cache of the streamed units that would not stay
cached anyway (a cyclic scan larger than the page cache evicts every page before its next use, as llama.cpp's
mmap finds), so the rest of the cache holds the units it can keep.

Embedding rows are read from the file per token. Hooks on each unit's forward fetch and release its weights, so
any caller (prefill, decode, drafting's verification, eval) streams without knowing it. CPU only.
"""
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

import checkpoint
import cpu_ops
import memory
import quantize
from cli import UsageError
from checkpoint import CheckpointError
from model import Transformer

ALIGN = 4096  # units in a stream file start on a page: one contiguous read each
SIZE_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
              "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
FORMAT = 1


class StreamingError(CheckpointError):
    """The file being streamed was changed or cut while the model runs: one line, exit code 2."""


def parse_size(text: str) -> int:
    """'2GB', '1.5GiB', '800MB', '3e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GB, 1.5GiB or 800MB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def format_size(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.{3 if size < 10 * scale else 2 if size < 100 * scale else 1}f} {unit}"
    return f"{size / 1e3:.1f} kB"


# ---------------------------------------------------------------- where each tensor lies in its file


@dataclass
class Placement:
    """One tensor of a unit: `owner.<name>` (a parameter or a buffer), `nbytes` at `offset` of the unit's file,
    at `slot_offset` of the memory it is read into."""
    owner: nn.Module
    name: str
    parameter: bool
    dtype: torch.dtype
    shape: tuple
    offset: int
    nbytes: int
    slot_offset: int = 0


@dataclass
class Unit:
    """What is fetched together: a transformer block or the output projection."""
    name: str
    module: nn.Module
    source: str  # "checkpoint" or "stream file"
    placements: list
    runs: list = field(default_factory=list)  # (file offset, bytes, slot offset): one pread each
    nbytes: int = 0  # of the memory it is read into


def lay_out(unit: Unit, gap: int = 4096):
    """Group the unit's tensors into runs of the file read by one pread each (tensors at most `gap` bytes
    apart: a checkpoint's records have headers between them, and a converter may not keep a layer's tensors
    together), packed one after another in the unit's memory."""
    unit.placements.sort(key=lambda p: p.offset)
    runs, end = [], 0
    for p in unit.placements:
        if runs and p.offset - (runs[-1][0] + runs[-1][1]) <= gap:
            start, length, slot = runs[-1]
            runs[-1] = (start, max(length, p.offset + p.nbytes - start), slot)
        else:
            runs.append((p.offset, p.nbytes, -(-end // 64) * 64))
        p.slot_offset = runs[-1][2] + p.offset - runs[-1][0]
        end = runs[-1][2] + runs[-1][1]
    unit.runs, unit.nbytes = runs, end


def tensors_of(module: nn.Module) -> list:
    """(owner, name, is parameter, tensor) for every parameter and buffer of `module` (KV caches excluded)."""
    found = []
    for owner in module.modules():
        if isinstance(owner, nn.Module) and type(owner).__name__ == "KVCache":
            continue
        found += [(owner, name, True, t) for name, t in owner._parameters.items() if t is not None]
        found += [(owner, name, False, t) for name, t in owner._buffers.items() if t is not None]
    return found


def assign(owner: nn.Module, name: str, parameter: bool, tensor: Tensor):
    if parameter:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def placeholder(dtype, shape) -> Tensor:
    """A CPU tensor of `shape` holding one element: what a unit's tensors are while it is not fetched."""
    return torch.zeros((), dtype=dtype).expand(shape)


def read_exactly(fd: int, buffer: Tensor, offset: int, path) -> None:
    """Fill the uint8 tensor `buffer` from `offset` of the file, or say that the file is shorter."""
    view, done = memoryview(buffer.numpy()).cast("B"), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise StreamingError(f"{path} ended at byte {offset + done} while streaming (it was truncated or "
                                 "replaced after loading); restore it or convert the model again")
        done += count


# ---------------------------------------------------------------- preparing the units once per load


def stream_digest(ckpt: checkpoint.Checkpoint, dtype) -> str:
    """What a stream file's bytes depend on: the checkpoint's identity, the dtype, the machine's kernels."""
    stat = ckpt.path.stat()
    key = {"format": FORMAT, "checkpoint": [str(ckpt.path.resolve()), stat.st_size, stat.st_mtime_ns],
           "dtype": str(dtype), **cpu_ops.machine_identity()}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def table_of(unit: Unit, start: int) -> list:
    return [[p.name, str(p.dtype), list(p.shape), p.offset - start, p.nbytes] for p in unit.placements]


class StreamFile:
    """The prepared units that are not the checkpoint's own bytes. Reused when its record (a JSON file beside
    it) says it was written for this checkpoint, dtype and machine and its tables agree; else written again
    (to a temporary name, renamed when complete)."""

    def __init__(self, ckpt: checkpoint.Checkpoint, dtype):
        digest = stream_digest(ckpt, dtype)
        folder = ckpt.path.parent / "streamed"
        self.path = folder / f"{ckpt.path.stem}.{digest}.bin"
        self.record_path = self.path.with_suffix(".json")
        self.tables, self.writer, self.position = None, None, 0
        try:
            record = json.loads(self.record_path.read_text())
            if self.path.stat().st_size == record["size"]:
                self.tables = record["units"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.previous_tables = dict(self.tables or {})  # what a rewrite keeps of the units before the first change

    def place(self, unit: Unit, tensors: list):
        """Record where `unit`'s prepared tensors lie in this file: as the existing file says (if its table
        matches), or where they are appended now."""
        position = self.position
        offsets, nbytes = [], []
        for _, _, _, tensor in tensors:
            position = -(-position // 64) * 64
            offsets.append(position)
            nbytes.append(tensor.numel() * tensor.element_size())
            position += nbytes[-1]
        start = self.position
        unit.placements = [Placement(owner, name, parameter, t.dtype, tuple(t.shape), offset, size)
                           for (owner, name, parameter, t), offset, size in zip(tensors, offsets, nbytes)]
        if self.tables is not None and self.tables.get(unit.name) != [start, table_of(unit, start)]:
            self.tables = None  # the kernels now want another layout (e.g. another path was chosen): rewrite
        if self.tables is None:
            if self.writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.temporary = self.path.with_name(self.path.name + ".tmp")
                self.writer = open(self.temporary, "wb")
                self.written = {}
                self.rewrite_up_to(start)
            self.write(unit, tensors, start)
        self.position = -(-position // ALIGN) * ALIGN

    def rewrite_up_to(self, start: int):
        """An existing file's units before `start` are copied over (their tables matched)."""
        if start:
            with open(self.path, "rb") as old:
                remaining = start
                while remaining:
                    chunk = old.read(min(remaining, 64 << 20))
                    if not chunk:
                        raise OSError("stream file shorter than its record")
                    self.writer.write(chunk)
                    remaining -= len(chunk)
            self.written = dict(self.previous_tables)

    def write(self, unit: Unit, tensors: list, start: int):
        for placement, (_, _, _, tensor) in zip(unit.placements, tensors):
            self.writer.seek(placement.offset)
            self.writer.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
        self.written[unit.name] = [start, table_of(unit, start)]

    def finish(self):
        if self.writer is None:
            return
        self.writer.truncate(self.position)
        self.writer.flush()
        os.fsync(self.writer.fileno())
        self.writer.close()
        os.replace(self.temporary, self.path)
        record = {"size": self.position, "units": self.written}
        with checkpoint.atomic_output(self.record_path) as tmp:
            tmp.write_text(json.dumps(record))
        self.writer = None


def prepare_units(model: Transformer, ckpt: checkpoint.Checkpoint, dtype) -> tuple:
    """Prepare every unit in the layout its kernels read and place its tensors: in the checkpoint where they
    are its own bytes, else in the stream file. Returns (units, embedding table placement, stream file path or
    None, the small tensors that stay resident). The embedding is (its placement, its source)."""
    checkpoint.load_into(model, ckpt)  # validated; tensors are views of the mapping, nothing is read yet
    base = checkpoint.mapping_start(ckpt.path, model.norm.weight)
    fd = os.open(ckpt.path, os.O_RDONLY)
    tied = ckpt.args.tie_word_embeddings and type(model.output) is nn.Linear
    stream = StreamFile(ckpt, dtype)
    modules = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)] + [("output", model.output)]
    units, embedding = [], None
    try:
        embedding_unit = Unit("tok_embeddings", model.tok_embeddings, "", [])
        for name, module in tqdm([("tok_embeddings", model.tok_embeddings)] + modules, desc="preparing layers",
                                 unit="unit", leave=False, file=sys.stderr):
            if name == "output" and tied:  # the output projection is the embedding table
                unit = Unit(name, module, embedding_unit.source, [])
                unit.placements = [Placement(module, "weight", True, *[getattr(embedding, k) for k in
                                                                       ("dtype", "shape", "offset", "nbytes")])]
                lay_out(unit)
                assign(module, "weight", True, placeholder(embedding.dtype, embedding.shape))
                units.append(unit)
                continue
            unit = embedding_unit if name == "tok_embeddings" else Unit(name, module, "", [])
            place_unit(unit, fd, base, dtype, stream)
            if name == "tok_embeddings":
                embedding = unit.placements[0]
            else:
                units.append(unit)
        stream.finish()
    finally:
        if stream.writer is not None:  # interrupted: no half-written stream file under the final name
            stream.writer.close()
            stream.temporary.unlink(missing_ok=True)
        os.close(fd)
    # the final norm (and anything else outside the units) is small: a copy of its own, resident
    rest = []
    unit_modules = {id(m) for _, root in modules for m in root.modules()} | {id(model.tok_embeddings)}
    for owner in model.modules():
        if id(owner) in unit_modules:
            continue
        for name, parameter, tensor in [(n, True, t) for n, t in owner._parameters.items() if t is not None] + \
                                       [(n, False, t) for n, t in owner._buffers.items() if t is not None]:
            copy = tensor.clone()
            assign(owner, name, parameter, copy.to(dtype) if copy.is_floating_point() else copy)
            rest.append(owner._parameters.get(name, owner._buffers.get(name)))
    uses_file = any(u.source == "stream file" for u in units) or embedding_unit.source == "stream file"
    return units, (embedding, embedding_unit.source), stream.path if uses_file else None, rest


def place_unit(unit: Unit, fd: int, base: int, dtype, stream: StreamFile):
    """Read the unit's checkpoint tensors (pread: the mapping stays untouched), convert and pack them as
    load_model does, and place them; the unit is left holding placeholders."""
    module = unit.module
    originals = tensors_of(module)
    plain = not any(isinstance(m, (quantize.Int8Linear, quantize.Int4Linear)) for m in module.modules())
    if plain and all(t.dtype == dtype or not t.is_floating_point() for *_, t in originals):
        # already the layout the kernels read: streamed from the checkpoint itself
        unit.source = "checkpoint"
        unit.placements = [Placement(owner, name, parameter, t.dtype, tuple(t.shape), t.data_ptr() - base,
                                     t.numel() * t.element_size()) for owner, name, parameter, t in originals]
    else:
        for owner, name, parameter, tensor in originals:
            copy = torch.empty(tensor.shape, dtype=tensor.dtype)
            read_exactly(fd, copy.view(-1).view(torch.uint8), tensor.data_ptr() - base, "the checkpoint")
            assign(owner, name, parameter, copy)
        module.to(dtype)
        if not plain:
            quantize.prepare_for_device(module, dtype)
        unit.source = "stream file"
        stream.place(unit, tensors_of(module))
    lay_out(unit)
    for p in unit.placements:
        assign(p.owner, p.name, p.parameter, placeholder(p.dtype, p.shape))


# ---------------------------------------------------------------- the embedding, read by rows


class StreamedEmbedding(nn.Module):
    """tok_embeddings whose rows are read from the file for the tokens at hand (a token needs one row)."""

    def __init__(self, streamer: "LayerStreamer", placement: Placement, source: str):
        super().__init__()
        self.streamer, self.placement, self.source = streamer, placement, source
        self.table = None  # the resident output projection, when it is this table (tied embeddings)
        self.weight = nn.Parameter(placeholder(placement.dtype, placement.shape), requires_grad=False)

    def forward(self, idx: Tensor) -> Tensor:
        if self.table is not None:
            return nn.functional.embedding(idx, self.table)
        rows, inverse = torch.unique(idx, return_inverse=True)
        dim = self.placement.shape[1]
        table = torch.empty(len(rows), dim, dtype=self.placement.dtype)
        row_bytes = dim * table.element_size()
        bytes_view = table.view(torch.uint8)
        for i, row in enumerate(rows.tolist()):
            self.streamer.read(self.source, bytes_view[i], self.placement.offset + row * row_bytes)
        return table[inverse]


# ---------------------------------------------------------------- the ring of slots and the reader


class LayerStreamer:
    """Holds the resident units and the ring of slots, and fetches streamed units in forward order."""

    def __init__(self, model: Transformer, units: list, embedding: tuple, paths: dict, budget: int, rest: list):
        self.model, self.units, self.budget, self.rest = model, units, budget, rest
        self.paths = paths  # source -> file path
        self.files = {source: os.open(path, os.O_RDONLY) for source, path in paths.items()}
        self.identity = {source: self.stat(source) for source in self.files}
        self.reads, self.bytes_read, self.read_seconds, self.wait_seconds = Counter(), 0, 0.0, 0.0
        self.planned_for, self.resident, self.slots = None, {}, []
        self.streamed, self.drop_cache = [], set()
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        self.loading = {}  # unit name -> (slot index, future)
        self.free_slots, self.lock = [], threading.Lock()
        self.current = None  # the unit whose forward is running
        model.tok_embeddings = StreamedEmbedding(self, *embedding)
        model.register_forward_pre_hook(lambda module, args: self.plan())
        self.unit_hooks = []  # on the streamed units only (plan): a resident unit runs as in a loaded model

    def stat(self, source):
        st = os.fstat(self.files[source])
        return st.st_size, st.st_mtime_ns

    def read(self, source: str, buffer: Tensor, offset: int):
        if self.stat(source) != self.identity[source]:
            raise StreamingError(f"{self.paths[source]} changed while streaming (its size or modification time "
                                 "differs from when it was loaded); restart generation with the file as it is now")
        read_exactly(self.files[source], buffer, offset, self.paths[source])

    # -- the budget

    def fixed_bytes(self) -> int:
        """What the budget holds before any unit: the KV cache, rope tables and masks, the final norm."""
        caches = [t for layer in self.model.layers if layer.attention.kv_cache is not None
                  for t in layer.attention.kv_cache.buffers()]
        tensors = [*self.model._buffers.values(), *caches, *self.rest]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def plan(self):
        """Split the budget (at the first forward, and again if the KV cache changed size)."""
        if self.current is not None:  # the last forward stopped inside a unit (an error, Ctrl-C)
            self.release(self.current)
        key = (self.model.max_batch_size, self.model.max_seq_length, self.model.cache_quantized)
        if self.planned_for == key:
            return
        fixed = self.fixed_bytes()
        self.wait_for_reads()
        for unit in self.units:
            for p in unit.placements:
                assign(p.owner, p.name, p.parameter, placeholder(p.dtype, p.shape))
        self.resident, self.slots, self.loading = {}, [], {}
        room = self.budget - fixed
        sizes = {u.name: u.nbytes for u in self.units}
        smallest = fixed + max(sizes.values())
        if room < max(sizes.values()):
            raise UsageError(f"--memory_budget {format_size(self.budget)} is smaller than the KV cache and the other "
                             f"resident tensors ({format_size(fixed)}) plus the largest layer ({format_size(max(sizes.values()))}): "
                             f"the smallest budget that works is {format_size(smallest)} (or lower --max_seq_length)")
        if sum(sizes.values()) <= room:
            resident, depth = list(self.units), 0
        else:
            for depth in (2, 1):
                resident, used = [], 0
                streamed = list(self.units)
                for unit in sorted(self.units, key=lambda u: -u.nbytes):
                    rest = [u for u in streamed if u is not unit]
                    if rest and used + unit.nbytes + depth * max(u.nbytes for u in rest) <= room:
                        resident.append(unit)
                        streamed, used = rest, used + unit.nbytes
                if used + depth * max(u.nbytes for u in streamed) <= room:
                    break
        names = {u.name for u in resident}
        self.streamed = [u for u in self.units if u.name not in names]
        self.drop_cache = {u.name for u in resident}  # their pages would only crowd the page cache
        for unit in resident:  # read once, kept for the whole run
            buffer = torch.empty(unit.nbytes, dtype=torch.uint8)
            self.fill(unit, buffer)
            self.resident[unit.name] = buffer
            self.point(unit, buffer)
        if self.streamed:
            slot_bytes = max(u.nbytes for u in self.streamed)
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(depth)]
        self.free_slots = list(range(len(self.slots)))
        for hook in self.unit_hooks:
            hook.remove()
        self.unit_hooks = []
        for unit in self.streamed:
            self.unit_hooks.append(unit.module.register_forward_pre_hook(lambda m, a, unit=unit: self.acquire(unit)))
            self.unit_hooks.append(unit.module.register_forward_hook(lambda m, a, out, unit=unit: self.release(unit)))
        # the embedding reads its rows from the output projection when that is resident and is the same table
        output = next(u for u in self.units if u.name == "output")
        embedding = self.model.tok_embeddings
        same = [p for p in output.placements if (p.offset, p.nbytes) == (embedding.placement.offset, embedding.placement.nbytes)
                and output.source == embedding.source]
        embedding.table = output.module.weight if same and output.name in self.resident else None
        # A cyclic scan larger than the page cache evicts each page before its next use: keep the first
        # streamed units the cache can hold cached, and drop the pages of the others as soon as they are read.
        cache_room, kept = 0.8 * memory.available_bytes("cpu"), 0
        self.drop_cache = set()
        for unit in self.streamed:
            kept += unit.nbytes
            if kept > cache_room:
                self.drop_cache.add(unit.name)
        self.planned_for = key

    def held_bytes(self) -> int:
        """Bytes of weights this process holds: resident units, the slots, the small resident tensors."""
        return (sum(b.numel() for b in self.resident.values()) + sum(s.numel() for s in self.slots)
                + sum(t.numel() * t.element_size() for t in self.rest))

    def counted_bytes(self) -> int:
        """What the budget counts now: the weights held and the KV cache, rope tables and masks."""
        return self.held_bytes() + self.fixed_bytes() - sum(t.numel() * t.element_size() for t in self.rest)

    def streamed_bytes(self) -> int:
        return sum(u.nbytes for u in self.streamed)

    # -- fetching

    def fill(self, unit: Unit, buffer: Tensor):
        """Read `unit` into `buffer` (the reader thread's work, or the planner's for resident units)."""
        began = time.perf_counter()
        for offset, length, slot_offset in unit.runs:
            self.read(unit.source, buffer[slot_offset:slot_offset + length], offset)
            if unit.name in self.drop_cache:
                os.posix_fadvise(self.files[unit.source], offset, length, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.reads[unit.name] += 1
            self.bytes_read += unit.nbytes
            self.read_seconds += time.perf_counter() - began

    def point(self, unit: Unit, buffer: Tensor):
        for p in unit.placements:
            view = buffer[p.slot_offset:p.slot_offset + p.nbytes].view(p.dtype).view(p.shape)
            assign(p.owner, p.name, p.parameter, view)

    def prefetch(self, after: int):
        """Start reading the streamed units that follow position `after` (cyclically) into the free slots."""
        count = len(self.streamed)
        for step in range(1, count + 1):
            if not self.free_slots:
                return
            unit = self.streamed[(after + step) % count]
            if unit.name in self.loading:
                continue
            slot = self.free_slots.pop(0)
            self.loading[unit.name] = (slot, self.reader.submit(self.fill, unit, self.slots[slot]))

    def acquire(self, unit: Unit):
        if unit.name in self.resident:
            return
        if unit.name not in self.loading:  # not the unit read ahead (a forward stopped midway, or a lone call)
            self.wait_for_reads()
            self.free_slots = list(range(len(self.slots)))
            self.prefetch(self.streamed.index(unit) - 1)
        slot, future = self.loading[unit.name]
        began = time.perf_counter()
        future.result()  # the reader's error, if any, is raised here
        self.wait_seconds += time.perf_counter() - began
        self.point(unit, self.slots[slot])
        self.current = unit
        self.prefetch(self.streamed.index(unit))

    def release(self, unit: Unit):
        if unit.name in self.resident:
            return
        self.current = None
        slot, _ = self.loading.pop(unit.name)
        for p in unit.placements:
            assign(p.owner, p.name, p.parameter, placeholder(p.dtype, p.shape))
        self.free_slots.append(slot)
        self.prefetch(self.streamed.index(unit))

    def wait_for_reads(self):
        for _, future in self.loading.values():
            try:
                future.result()
            except Exception:
                pass  # raised again when that unit is asked for
        self.loading = {}

    def summary(self) -> str:
        resident = len(self.units) - len(self.streamed)
        return (f"Streaming: {len(self.streamed)} of {len(self.units)} units read per forward "
                f"({format_size(self.streamed_bytes())}), {resident} resident; holding {format_size(self.held_bytes())} "
                f"of weights ({len(self.slots)} slot{'s' if len(self.slots) != 1 else ''}) under a budget of "
                f"{format_size(self.budget)}; {format_size(self.bytes_read)} read so far at "
                f"{self.bytes_read / max(self.read_seconds, 1e-9) / 1e9:.2f} GB/s, {self.wait_seconds:.2f} s waited for reads")

    def close(self):
        self.wait_for_reads()
        self.reader.shutdown()
        for fd in self.files.values():
            os.close(fd)
        self.files = {}


def stream_model(model: Transformer, ckpt: checkpoint.Checkpoint, dtype, budget: int) -> LayerStreamer:
    """Prepare `model` (built on the meta device, quantized modules swapped in) to stream from `ckpt`."""
    units, embedding, stream_path, rest = prepare_units(model, ckpt, dtype)
    paths = {"checkpoint": ckpt.path}
    if stream_path is not None:
        paths["stream file"] = stream_path
    model.streamer = LayerStreamer(model, units, embedding, paths, budget, rest)
    return model.streamer
