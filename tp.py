"""Tensor parallel across the processes torchrun starts (gloo on CPU, nccl on CUDA), and the start-up,
layout and communication counting that pipeline stages (pipeline.py) share with it.

    torchrun --standalone --nproc_per_node=2 generate.py --compile --checkpoint_path checkpoints/NAME/model.pth

model.py knows nothing of this file. `generate.load_model` builds the model on the meta device and assigns the
memory-mapped weights; then, *before* the weights are converted to the run dtype or moved to the device,
`shard_tensor_parallel` (or pipeline.shard_pipeline) cuts out this rank's part. Slicing a memory-mapped
tensor and copying the slice reads only that slice's pages, and modules a rank drops are never read at all,
so a rank's memory is about its share of the model.

Tensor parallel, in the Megatron style (every rank runs every layer on a slice of it):
  - wqkv keeps the output rows of this rank's whole heads: a contiguous block of KV heads and the query heads
    of their GQA groups, so attention needs no communication. Qwen2's qkv bias is sliced with the same rows.
    Qwen3's q/k norms weigh each head's head_dim features with one vector shared by all heads: every rank
    keeps it whole. The attention's head counts are set to the local ones; the KV cache is sized from them.
  - w1 (gate) and w3 (up) keep a block of the MLP's intermediate rows, w2 (down) the matching input columns.
  - wo and w2 then produce partial sums: a forward hook all-reduces their output (two all-reduces per layer).
  - Heads and MLP rows are split as evenly as whole heads allow (SmolLM2's 3 KV heads go 1 + 2 over 2 ranks):
    requiring divisibility would rule out most small models. A rank with no KV head is the error case.
  - Quantized layers are sliced before `quantize.prepare_for_device` packs them: int8 rows take their scales,
    int8 columns keep every scale (a row's scale multiplies each partial sum alike, so the sums add up);
    int4 rows take their scales and zeros, int4 columns must start and end on group boundaries.
  - Embedding, final norm and output projection are replicated: every rank computes the same logits, so every
    rank samples the same token (same seed) and no token needs to be sent.

Communication is counted in small int64 buffers on the modules that communicate, incremented in place (so the
count also runs inside a compiled graph): [one-token calls, longer calls] x [messages, bytes].
"""
import contextlib
import functools
import os
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

import memory
import quantize
from cli import UsageError
from model import Transformer

# Start-up (rendezvous, first barrier) must fail fast when a rank is missing. Generation collectives get a long
# timeout instead: one rank may spend minutes compiling while the others wait at their first all-reduce.
STARTUP_TIMEOUT_S = float(os.environ.get("GPT_FAST_STARTUP_TIMEOUT", "60"))
WORK_TIMEOUT = timedelta(minutes=30)
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(UsageError):
    """A launch or layout that cannot work: one line `error: ...` (from rank 0 only), exit code 2 on every rank."""


@dataclass
class Layout:
    """Where this process stands: its rank, the device and process groups, and how the model is split."""

    rank: int
    world_size: int
    device: torch.device
    group: object  # every rank, long timeout: generation collectives
    pipeline_stages: Optional[list] = None  # layers per stage; None means tensor parallel
    pairs: dict = field(default_factory=dict)  # pipeline: lower rank r -> group {r, r + 1}


# ---------------------------------------------------------------- start-up


def init(device: str, pipeline_stages: Optional[list] = None) -> Optional[Layout]:
    """Join torchrun's process group when launched with WORLD_SIZE > 1; None for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if pipeline_stages and len(pipeline_stages) > 1:
            raise DistributedError(f"--pipeline_stages {format_stages(pipeline_stages)} needs one process per stage: "
                                   f"launch with torchrun --standalone --nproc_per_node={len(pipeline_stages)}")
        return None
    missing = [name for name in RENDEZVOUS_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not: "
                               f"launch with torchrun --standalone --nproc_per_node={world_size} generate.py ...")
    if pipeline_stages and len(pipeline_stages) != world_size:
        raise DistributedError(f"--pipeline_stages {format_stages(pipeline_stages)} has {len(pipeline_stages)} stages "
                               f"but torchrun started {world_size} processes: use --nproc_per_node={len(pipeline_stages)}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                   f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        with native_stderr_silenced():  # c10d logs each failed connection attempt, with a C++ stack trace
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
                                    device_id=device if device.type == "cuda" else None)
            dist.barrier()  # every rank is up, or the start-up timeout ends it
    except Exception as error:  # the store raises DistStoreError, gloo RuntimeError, env:// ValueError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise DistributedError(
            f"no rendezvous with all {world_size} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"within {STARTUP_TIMEOUT_S:g} s ({reason}); start every rank through torchrun "
            f"(or raise GPT_FAST_STARTUP_TIMEOUT)") from None
    if rank != 0:  # from here on every rank says the same: rank 0 says it
        silence(rank)
    group = dist.new_group(timeout=WORK_TIMEOUT)
    pairs = {r: dist.new_group([r, r + 1], timeout=WORK_TIMEOUT) for r in range(world_size - 1)} if pipeline_stages else {}
    return Layout(rank, world_size, device, group, pipeline_stages, pairs)


@contextlib.contextmanager
def native_stderr_silenced():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def silence(rank: int):
    """Only rank 0 prints. The others' stdout and stderr (file descriptors too: gloo's C++ logs) go to
    /dev/null; an unexpected traceback still reaches the terminal, labelled with its rank."""
    terminal = os.fdopen(os.dup(2), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def excepthook(kind, value, tb):
        terminal.write(f"[rank {rank}] " + "".join(traceback.format_exception(kind, value, tb)))
        terminal.flush()

    sys.excepthook = excepthook


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def format_stages(stages: list) -> str:
    return ",".join(map(str, stages))


def split(n: int, parts: int, index: int) -> tuple:
    """The index-th of `parts` contiguous ranges of range(n), as equal as whole units allow."""
    return n * index // parts, n * (index + 1) // parts


# ---------------------------------------------------------------- counting communication


def add_counter(module: nn.Module, name: str):
    # [one-token calls (decode), longer calls (prefill)] x [messages, bytes]. A buffer, so that it moves with the
    # model and counts in place inside a compiled graph (CUDA graphs treat module buffers as static too).
    module.register_buffer(name, torch.zeros(2, 2, dtype=torch.int64), persistent=False)


def tally(counter: Tensor, x: Tensor):
    row = 0 if x.shape[-2] == 1 else 1
    counter[row] += torch.tensor([1, x.numel() * x.element_size()], device=counter.device)


def counters(model: nn.Module) -> list:
    return [buffer for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] in ("all_reduces", "transfers")]


def reset_communication(model: nn.Module):
    for counter in counters(model):
        counter.zero_()


def communication_per_step(model: nn.Module, decode_steps: int) -> tuple:
    """(messages, bytes) of this rank per one-token decode step, from the counters since the last reset."""
    total = sum((counter[0] for counter in counters(model)), torch.zeros(2, dtype=torch.int64)).tolist()
    return total[0] / max(decode_steps, 1), total[1] / max(decode_steps, 1)


def communication_line(model: nn.Module, layout: Layout, decode_steps: int) -> str:
    messages, nbytes = communication_per_step(model, decode_steps)
    kind = "all-reduces" if layout.pipeline_stages is None else "transfers (sent or received by rank 0)"
    mode = (f"tensor parallel over {layout.world_size}" if layout.pipeline_stages is None
            else f"pipeline stages {format_stages(layout.pipeline_stages)}")
    return f"Communication per decode step: {messages:.0f} {kind}, {nbytes / 1e3:.1f} KB ({mode})"


# ---------------------------------------------------------------- tensor parallel


ROW_TENSORS = ("weight", "bias", "scales", "zeros")  # per-output-row tensors of Linear, Int8Linear, Int4Linear


def replace(module: nn.Module, name: str, tensor: Optional[Tensor]):
    old = getattr(module, name)
    if isinstance(old, nn.Parameter) and tensor is not None:
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(module, name, tensor)
    release(old)


MAPPINGS = []  # filled by each shard call: the checkpoint was mapped just before


def release(tensor: Optional[Tensor]):
    """Drop a memory-mapped source tensor's pages from this process once its slice is copied: slicing columns
    touches every page of a weight, and without this a rank's peak would hold most of the file
    (memory.release_mapped_pages)."""
    memory.release_mapped_pages(tensor, MAPPINGS)


def keep_rows(module: nn.Module, name: str, ranges: list):
    """Keep the output rows in `ranges` ([(start, end)]) of a linear, with their bias, scales and zeros."""
    rows = sum(end - start for start, end in ranges)
    if isinstance(module, quantize.Int4Linear) and rows % 16:  # the CPU packing needs 16, CUDA's 8
        raise DistributedError(f"{name}: this rank would keep {rows} output rows, and int4 kernels need a multiple "
                               f"of 16; use the int8 or float checkpoint, or another number of processes")
    for attr in ROW_TENSORS:
        tensor = getattr(module, attr, None)
        if tensor is not None:  # torch.cat copies: only the kept rows' pages of the memory-mapped file are read
            replace(module, attr, torch.cat([tensor[start:end] for start, end in ranges]))
    module.out_features = rows


def keep_columns(module: nn.Module, name: str, start: int, end: int, keep_bias: bool):
    """Keep the input columns [start, end) of a linear whose partial outputs are then summed over ranks."""
    if isinstance(module, quantize.Int4Linear) and module.groupsize == module.in_features:
        # one group per channel: every rank keeps each row's scale and zero, as int8 per channel does
        replace(module, "weight", module.weight[:, start // 2:end // 2].clone())
        module.groupsize = end - start
    elif isinstance(module, quantize.Int4Linear):
        size = module.groupsize
        if start % size or end % size:
            raise DistributedError(f"{name}: this rank's input columns {start}-{end} of {module.in_features} do not "
                                   f"fall on int4 group boundaries (group size {size}); use the int8 or float "
                                   f"checkpoint, or another number of processes")
        replace(module, "weight", module.weight[:, start // 2:end // 2].clone())  # two codes per byte, even first
        replace(module, "scales", module.scales[:, start // size:end // size].clone())
        replace(module, "zeros", module.zeros[:, start // size:end // size].clone())
    else:  # float or int8; int8 keeps every per-row scale: it multiplies each partial sum alike
        replace(module, "weight", module.weight[:, start:end].clone())
    if getattr(module, "bias", None) is not None and not keep_bias:
        module.bias = None  # added once, by rank 0, not once per rank
    module.in_features = end - start


def all_reduce_output(module: nn.Module, inputs, output: Tensor, group) -> Tensor:
    tally(module.all_reduces, output)
    return funcol.all_reduce(output, "sum", group)


def mlp_unit(feed_forward: nn.Module) -> int:
    """MLP rows go to ranks in whole units: int4 w2 columns by groups, int4 w1/w3 rows by 16 (kernel tiles)."""
    if isinstance(feed_forward.w2, quantize.Int4Linear):  # per channel: whole blocks of the native kernel's 32
        w2 = feed_forward.w2
        return w2.groupsize if w2.groupsize != w2.in_features else 32
    if any(isinstance(m, quantize.Int4Linear) for m in (feed_forward.w1, feed_forward.w3)):
        return 16
    return 1


def shard_tensor_parallel(model: Transformer, layout: Layout) -> Transformer:
    args, rank, world = model.args, layout.rank, layout.world_size
    MAPPINGS[:] = memory.checkpoint_mappings()
    if args.n_local_heads < world:
        raise DistributedError(f"tensor parallel over {world} processes needs at least {world} KV heads (each rank "
                               f"keeps whole heads), but this model has {args.n_head} heads and {args.n_local_heads} "
                               f"KV heads: use --nproc_per_node={args.n_local_heads} or fewer, or --pipeline_stages")
    kv_start, kv_end = split(args.n_local_heads, world, rank)
    per_kv = args.n_head // args.n_local_heads  # query heads sharing each KV head
    q_start, q_end = kv_start * per_kv, kv_end * per_kv
    d = args.head_dim
    q_rows = (q_start * d, q_end * d)
    k_rows = ((args.n_head + kv_start) * d, (args.n_head + kv_end) * d)
    v_rows = ((args.n_head + args.n_local_heads + kv_start) * d, (args.n_head + args.n_local_heads + kv_end) * d)
    for i, layer in enumerate(model.layers):
        attention, feed_forward = layer.attention, layer.feed_forward
        keep_rows(attention.wqkv, f"layers.{i}.attention.wqkv", [q_rows, k_rows, v_rows])
        keep_columns(attention.wo, f"layers.{i}.attention.wo", *q_rows, keep_bias=rank == 0)
        attention.n_head, attention.n_local_heads = q_end - q_start, kv_end - kv_start
        unit = mlp_unit(feed_forward)
        units = args.intermediate_size // unit
        if units < world:
            raise DistributedError(f"the MLP's {args.intermediate_size} rows cannot go to {world} processes in whole "
                                   f"units of {unit}; use fewer processes")
        mlp_start, mlp_end = (unit * i for i in split(units, world, rank))
        keep_rows(feed_forward.w1, f"layers.{i}.feed_forward.w1", [(mlp_start, mlp_end)])
        keep_rows(feed_forward.w3, f"layers.{i}.feed_forward.w3", [(mlp_start, mlp_end)])
        keep_columns(feed_forward.w2, f"layers.{i}.feed_forward.w2", mlp_start, mlp_end, keep_bias=rank == 0)
        for linear in (attention.wo, feed_forward.w2):
            add_counter(linear, "all_reduces")
            linear.register_forward_hook(functools.partial(all_reduce_output, group=layout.group))
    model.shard_description = (f"heads {q_start}-{q_end - 1} of {args.n_head}, KV heads {kv_start}-{kv_end - 1} of "
                               f"{args.n_local_heads}, MLP rows {mlp_start}-{mlp_end - 1} of {args.intermediate_size}")
    return model


# ---------------------------------------------------------------- per-rank tables


def gather_rows(row: dict, layout: Layout) -> Optional[list]:
    """Every rank's `row` on rank 0 (None elsewhere); every rank must call this."""
    rows = [None] * layout.world_size
    dist.all_gather_object(rows, row)
    return rows if layout.rank == 0 else None
