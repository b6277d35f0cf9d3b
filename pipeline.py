"""Pipeline stages across the processes torchrun starts: each rank runs a contiguous block of layers.

    torchrun --standalone --nproc_per_node=3 generate.py --pipeline_stages 10,10,12 --checkpoint_path ...

As in Jupiter:
  - the rank keeps its slice of `model.layers` (the KV cache is built for those layers only);
  - on later stages `tok_embeddings` becomes ReceiveActivations (the previous stage's hidden states);
  - on earlier stages `norm` becomes SendActivations and `output` ReceiveLogits; the last stage's output
    projection sends its logits to every other rank, so each rank again samples the same token;
  - an eager prefill is split into one sub-sequence per stage (PipelineTransformer): sends are asynchronous,
    so stage s works on sub-sequence i while stage s+1 works on i - 1. Causal attention over the KV cache
    makes the split exact: each sub-sequence attends to the cache entries the earlier ones wrote.

Under torch.compile (decode step, fullgraph) functional broadcast does not compile ("arg type Any is not yet
supported by custom_op_wrapper" under cpp_wrapper) and there is no traceable send/recv, so under compile a
transfer is an all-reduce over the two ranks in which the receiver contributes zeros: the same bytes per rank
pair and an exact copy (x + 0 = x). Eager code (prefill) uses real send/recv. Start-up, the Layout and the
communication counters are tp.py's.
"""
import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from model import Transformer
from tp import DistributedError, Layout, add_counter, format_stages, split, tally

ACTIVATIONS, LOGITS = 0, 1  # message tags


def parse_stages(text: str) -> list:
    """'10,10,12' -> [10, 10, 12]; ValueError with the reason otherwise."""
    try:
        stages = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--pipeline_stages {text!r} must be layer counts separated by commas, e.g. 10,10,12") from None
    if any(n < 1 for n in stages):
        raise ValueError(f"--pipeline_stages {text!r}: every stage needs at least one layer")
    return stages


# ---------------------------------------------------------------- pipeline stages


class Pipe:
    """The links of one pipeline rank. Eager: point-to-point isend/irecv, kept pending until the forward ends.
    Compiled: an all-reduce over the pair of ranks (or all ranks, for logits) in which receivers contribute zeros."""

    def __init__(self, layout: Layout, stages: list):
        self.rank, self.last, self.layout = layout.rank, len(stages) - 1, layout
        self.pending = []

    def send(self, x: Tensor, dst: int, counter: Tensor):
        tally(counter, x)
        if torch.compiler.is_compiling():
            funcol.all_reduce(x, "sum", self.layout.pairs[min(self.rank, dst)])
        else:
            x = x.contiguous()
            self.pending.append((dist.isend(x, dst, group=self.layout.group, tag=ACTIVATIONS), x))

    def receive(self, shape, like: Tensor, src: int, counter: Tensor, wait: bool) -> Tensor:
        buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        tally(counter, buffer)
        if torch.compiler.is_compiling():
            return funcol.all_reduce(buffer, "sum", self.layout.pairs[min(self.rank, src)])
        work = dist.irecv(buffer, src, group=self.layout.group, tag=ACTIVATIONS)
        if wait:
            work.wait()
        else:
            self.pending.append((work, buffer))
        return buffer

    def share_logits(self, logits: Tensor, counter: Tensor) -> Tensor:
        """Last stage: its logits to every rank. Other ranks: logits is a zero buffer to receive into."""
        tally(counter, logits)
        if torch.compiler.is_compiling():
            return funcol.all_reduce(logits, "sum", self.layout.group)
        if self.rank == self.last:
            for dst in range(self.last):
                self.pending.append((dist.isend(logits, dst, group=self.layout.group, tag=LOGITS), logits))
        else:  # waited for at the end of the forward, so the next prefill sub-sequence can start meanwhile
            self.pending.append((dist.irecv(logits, self.last, group=self.layout.group, tag=LOGITS), logits))
        return logits

    def wait(self):
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class ReceiveActivations(nn.Module):
    """In place of the embedding on later stages: the previous stage's hidden states for these tokens."""

    def __init__(self, pipe: Pipe, dim: int):
        super().__init__()
        self.pipe, self.dim = pipe, dim
        # Transformer.forward reads the embedding's dtype (the run dtype): an empty table carries it.
        self.register_buffer("weight", torch.empty(0, dim), persistent=False)
        add_counter(self, "transfers")

    def forward(self, idx: Tensor) -> Tensor:
        return self.pipe.receive((*idx.shape, self.dim), self.weight, self.pipe.rank - 1, self.transfers, wait=True)


class SendActivations(nn.Module):
    """In place of the final norm on earlier stages: hands the hidden states to the next stage."""

    def __init__(self, pipe: Pipe):
        super().__init__()
        self.pipe = pipe
        self.register_buffer("weight", torch.empty(0), persistent=False)  # setup_caches reads the norm's dtype/device
        add_counter(self, "transfers")

    def forward(self, x: Tensor) -> Tensor:
        self.pipe.send(x, self.pipe.rank + 1, self.transfers)
        return x


class ReceiveLogits(nn.Module):
    """In place of the output projection on earlier stages: the last stage's logits."""

    def __init__(self, pipe: Pipe, vocab_size: int):
        super().__init__()
        self.pipe, self.vocab_size = pipe, vocab_size
        add_counter(self, "transfers")

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(*x.shape[:-1], self.vocab_size, dtype=x.dtype, device=x.device)
        return self.pipe.share_logits(logits, self.transfers)


def share_output_logits(module: nn.Module, inputs, logits: Tensor, pipe: Pipe) -> Tensor:
    return pipe.share_logits(logits, module.transfers)


class PipelineTransformer(Transformer):
    """A Transformer holding one pipeline stage. A long eager prefill runs as one sub-sequence per stage, so
    that the stages overlap; every eager forward ends by waiting for its pending sends and receives.
    Other forward arguments pass through untouched (a call with a mask or more arguments is not split).
    A hidden state returned by the forward is the final normed one on the last stage only."""

    prefill_chunks = 0  # 0: one sub-sequence per stage

    def forward(self, idx: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None, *args, **kwargs):
        if torch.compiler.is_compiling():
            return super().forward(idx, input_pos, mask, *args, **kwargs)
        # Every rank computes the full logits: a stage's sub-sequence outputs are put together along the sequence
        # and the last stage's logits buffer is sized on each rank from its own input.
        kwargs.pop("last_only", None)
        chunks = min(self.prefill_chunks or len(self.pipe_stages), idx.shape[1])
        # Flags pass to every sub-sequence; a mask or other per-token tensors would need splitting too: not split.
        per_token = mask is not None or args or any(isinstance(v, Tensor) for v in kwargs.values())
        if per_token or chunks < 2:
            outputs = [Transformer.forward(self, idx, input_pos, mask, *args, **kwargs)]
        else:
            bounds = [split(idx.shape[1], chunks, i) for i in range(chunks)]
            outputs = [Transformer.forward(self, idx[:, a:b], input_pos[a:b], **kwargs) for a, b in bounds]
        self.pipe.wait()
        if len(outputs) == 1:
            return outputs[0]
        if isinstance(outputs[0], tuple):  # e.g. (logits, hidden): each part along the sequence
            return tuple(torch.cat(parts, dim=1) for parts in zip(*outputs))
        return torch.cat(outputs, dim=1)


def shard_pipeline(model: Transformer, layout: Layout) -> Transformer:
    stages, rank, args = layout.pipeline_stages, layout.rank, model.args
    if sum(stages) != args.n_layer:
        raise DistributedError(f"--pipeline_stages {format_stages(stages)} sums to {sum(stages)} layers but the model has "
                               f"{args.n_layer}: give layer counts that sum to {args.n_layer}")
    start = sum(stages[:rank])
    end = start + stages[rank]
    pipe = Pipe(layout, stages)
    # Only this stage's layers stay; the others' weights are never read from the file.
    model.layers = nn.ModuleList(list(model.layers)[start:end])
    holds = [f"layers {start}-{end - 1} of {args.n_layer}"]
    if rank > 0:
        model.tok_embeddings = ReceiveActivations(pipe, args.dim)
    else:
        holds.append("embedding")
    if rank < pipe.last:
        model.norm, model.output = SendActivations(pipe), ReceiveLogits(pipe, args.vocab_size)
    else:
        add_counter(model.output, "transfers")
        model.output.register_forward_hook(functools.partial(share_output_logits, pipe=pipe))
        holds.append("norm, output")
    model.__class__ = PipelineTransformer
    model.pipe, model.pipe_stages = pipe, stages
    model.shard_description = ", ".join(holds)
    return model


