"""Decode-time kernel paths: how one decoded token's products are computed under torch.compile, per device.

On CPU one decoded token is a chain of matrix-vector products. `use_decode_kernels` swaps each plain Linear
for DecodeLinear and each Attention for DecodeAttention, whose one-token cases are written as elementwise
products and sums that inductor fuses into vectorised loops (the README's "Why the CPU decode is fast" has
the measurements). Quantized modules (quantize.py) keep their own one-token paths. Longer inputs (prefill,
verification of several drafted tokens) take the ordinary matmul and SDPA. Eager mode never sees these classes.
"""
import torch
from torch import Tensor

import cpu_ops
from model import Attention


class DecodeLinear(torch.nn.Linear):
    """A Linear whose one-token product is written as a reduction, for torch.compile on CPU.

    Inductor turns `(x * W).sum(-1)` into one vectorised C++ loop that reads the 16-bit weights once,
    widens them in registers and accumulates in float32. On a 2-core AVX2 machine that reads SmolLM2's
    weights at about twice the speed of the oneDNN bf16 linear (scripts/bench.py; numbers in the README).
    Where the plain linear is faster on the running machine, `choose_float_paths` sets `path` to "linear".
    """

    path = "reduction"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != 1 or self.path == "linear":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return self.reduction(x)

    def reduction(self, x: Tensor) -> Tensor:
        y = (x[..., None, :].float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class DecodeAttention(Attention):
    """Attention whose one-query-token case is written as reductions, for torch.compile on CPU.

    One query row attends over a small cache; as elementwise products and sums, inductor fuses it into its
    own loops instead of calling the flash-attention kernel (about 85 us per layer call here). Query heads
    are grouped over their KV head, so the cache is read as it is. Measured (scripts/bench.py conditions):
    int4 86 -> 109 tok/s; bfloat16 and int8 unchanged within noise.
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if q.shape[2] != 1:
            return super().attend(q, k, v, mask)
        batch, heads, _, head_dim = q.shape
        kv_heads = k.shape[1]
        q = q.view(batch, kv_heads, heads // kv_heads, 1, head_dim).float()
        scores = (q * k[:, :, None].float()).sum(-1) * head_dim ** -0.5  # [batch, kv_heads, group, cache_len]
        scores = scores.masked_fill(~mask, -float("inf"))  # mask [.., 1, cache_len] broadcasts over the group
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [batch, kv_heads, group, head_dim]
        return out.view(batch, heads, 1, head_dim).to(k.dtype)


@torch.no_grad()
def choose_float_paths(models: list, choices: cpu_ops.KernelChoices):
    """Per float linear shape, the reduction (timed compiled) or the plain linear (timed eager: in the graph
    it is the same external call), whichever is faster on this machine for one token (cached in `choices`)."""
    from tqdm import tqdm

    layers = [m for model in models for m in model.modules() if type(m) is DecodeLinear]
    keys = {m: f"float {m.out_features}x{m.in_features} {str(m.weight.dtype).removeprefix('torch.')} rows 1 compiled"
            for m in layers}
    for module in tqdm(layers, desc="timing compiled paths", unit="layer", leave=False,
                       disable=all(key in choices.choices for key in keys.values())):
        x = torch.randn(1, 1, module.in_features, dtype=module.weight.dtype)
        timers = {"reduction": lambda: cpu_ops.time_compiled(module.reduction, x),
                  "linear": lambda: cpu_ops.time_call(lambda: torch.nn.functional.linear(x, module.weight, module.bias))}
        module.path = choices.choose(keys[module], timers)
    choices.save()


def use_decode_kernels(models: list, device, choose: bool = True):
    """Set up `models` (target, draft, Medusa heads) and inductor for a compiled decode on `device`; with
    `choose`, each float linear's one-token path is the faster of two on this machine (choose_float_paths)."""
    if torch.device(device).type != "cpu":
        return  # CUDA: inductor's own matmuls and CUDA graphs (mode="reduce-overhead", in generate.py)
    import torch._inductor.config as inductor_config

    for module in (m for model in models for m in model.modules()):
        if type(module) is torch.nn.Linear:  # plain float linears only; quantized modules keep their paths
            module.__class__ = DecodeLinear
        elif type(module) is Attention:
            module.__class__ = DecodeAttention
    # cpp_wrapper drops Python launch overhead between kernels. Freezing stays off: it would fold the
    # weights' float() into float32 copies and double the bytes read per token.
    inductor_config.cpp_wrapper = True
    if choose:
        choose_float_paths(models, cpu_ops.KernelChoices())
