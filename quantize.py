"""Weight-only quantization as module swaps: int8 (per output channel or grouped) and int4 (grouped, asymmetric).

    python quantize.py --checkpoint_path checkpoints/NAME/model.pth --mode int8               # -> model_int8.pth
    python quantize.py --checkpoint_path checkpoints/NAME/model.pth --mode int8 --groupsize 32  # -> model_int8.g32.pth
    python quantize.py --checkpoint_path checkpoints/NAME/model.pth --mode int4 --groupsize 32  # -> model_int4.g32.pth
    python quantize.py --checkpoint_path checkpoints/NAME/model.pth --mode int4-gptq --groupsize 32 \
        [--calibration_file FILE]                                                          # -> model_int4-gptq.g32.pth

The file on disk is device-independent (int8 values, int4 values two per byte, float32 scales and zeros);
each module packs itself for its device's kernel when the model is loaded (`prepare_for_device`).
model.py never sees any of this: `swap_linears` replaces nn.Linear modules before the weights are assigned.
The tied output projection of models like SmolLM2 gets its own int8 copy in every mode (the embedding
lookup stays in float): it is a fifth of SmolLM2's weight bytes. `--output_projection int4` makes it int4 in
the int4 modes, as llama.cpp's Q4_0 files have it (a third fewer bytes per token, for a little quality).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import checkpoint
import cli
import cpu_ops
from checkpoint import CheckpointError
from cli import ArgumentParser, UsageError
from model import FeedForward, Transformer, quantize_kv
from tokenizer import load_tokenizer

GROUP_SIZES = (32, 64, 128, 256)
# On CPU the int8/int4 kernels are fast with 16-bit activations only (measured here: float32 activations
# 10-25x slower), so float32 activations are rounded to bfloat16 for the product and the result cast back.
CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


# CUDA's int4 kernel (tinygemm) takes bfloat16 activations and scales only.
CUDA_INT4_INNER_K_TILES = (8, 4, 2)  # its packed layout's tiles of 16 inputs: the widest that divides K


PER_CHANNEL = 0  # `--groupsize channel`: one scale (int4: and zero) per output channel, over all its inputs


def groupsize_arg(text: str) -> int:
    """The --groupsize flag's type (quantize.py, scripts/qat.py): one of GROUP_SIZES, or "channel" (PER_CHANNEL)."""
    if text == "channel":
        return PER_CHANNEL
    if text.isdigit() and int(text) in GROUP_SIZES:
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid choice: {text} (choose from {', '.join(map(str, GROUP_SIZES))}, channel)")


def kernel_dtype(dtype, device_type: str = "cpu"):
    return dtype if device_type == "cpu" and dtype in CPU_KERNEL_DTYPES else torch.bfloat16


def kernel_input(x: Tensor) -> Tensor:
    return x if x.dtype == kernel_dtype(x.dtype, x.device.type) else x.to(torch.bfloat16)


# ---------------------------------------------------------------- the math


def quantize_int8(weight: Tensor, groupsize=None):
    """Symmetric: weight ≈ q * scale, q in [-127, 127], one scale per output channel (scales [N]) or, with
    `groupsize`, per group of that many inputs (scales [N, K/groupsize]: a GGUF Q8_0 block is one such group)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, groupsize or in_features)
    scales = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    q = torch.round(groups / scales).clamp(-127, 127).to(torch.int8)
    scales = scales.squeeze(-1)
    return q.reshape(out_features, in_features), scales if groupsize else scales.squeeze(-1)


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    """float32 weights from int8 values and per-channel [N] or per-group [N, K/groupsize] scales."""
    scales = scales.float().reshape(q.shape[0], -1, 1)  # [N, groups, 1]; per channel: one group
    return (q.float().reshape(q.shape[0], scales.shape[1], -1) * scales).reshape(q.shape)


def quantize_int4(weight: Tensor, groupsize=None):
    """Asymmetric per group of `groupsize` inputs (None: one group per output channel, all its inputs):
    weight ≈ (q - 8) * scale + zero, q in [0, 15].

    This (q - 8) * scale + zero form is what the CPU and CUDA int4 kernels compute; a GGUF Q4_1 block
    (d * q + m) is the same with scale = d, zero = m + 8 d.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, groupsize or in_features)
    scales, zeros = int4_group_params(groups)
    q = int4_codes(groups, scales[..., None], zeros[..., None]).to(torch.uint8)
    return q.reshape(out_features, in_features), scales, zeros


def int4_group_params(groups: Tensor):
    """Scale and zero of `groups` [.., groupsize]: the group's range spread over the 16 codes."""
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low).clamp(min=1e-6) / 15
    return scales, low + scales * 8


def int4_codes(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    return torch.round((w - zeros) / scales + 8).clamp(0, 15)


def pack_int4(q: Tensor) -> Tensor:
    """[N, K] values 0..15 -> [N, K/2] bytes, even columns in the low nibble (our on-disk layout)."""
    return (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, groupsize=None) -> Tensor:
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, -1, groupsize or in_features) - 8
    return (groups * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


def fake_quantize_weight(weight: Tensor, kind: str, groupsize=None) -> Tensor:
    """The float32 weights a layer of `kind` ("int8", "int4") holds after quantize_checkpoint's rounding to
    nearest: what QAT trains through, and exactly what the written checkpoint dequantizes to."""
    if kind == "int8":
        return dequantize_int8(*quantize_int8(weight, groupsize))
    q, scales, zeros = quantize_int4(weight, groupsize)
    return dequantize_int4(q, scales, zeros, groupsize)


def fake_quantize_activations(x: Tensor) -> Tensor:
    """8-bit activations, symmetric per token (one scale per row of the layer's input), as LLM-QAT's W4A8:
    a checkpoint trained with them (record "activation_bits": 8) rounds its inputs so at inference too."""
    scales = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return (torch.round(x.float() / scales).clamp(-127, 127) * scales).to(x.dtype)


# ---------------------------------------------------------------- modules

TILES_CHUNK_BYTES = 8 << 20  # a prompt's weights widened from the tiles this much at a time (in L3, not all at once)


def linear_from_tiles(x: Tensor, out_features: int, weight_rows) -> Tensor:
    """x [rows, K] times a quantized layer's weights widened from its native tiles (weight_rows(n0, n1): channels
    [n0, n1) as x.dtype rows) a chunk of channels at a time, through the float matrix product: a prompt reads the
    weights once whatever its length, so widening them costs little beside a product that oneDNN runs on AMX or
    AVX512_BF16 where the CPU has them (2048x8192 int4, 512 rows, Xeon: 28 ms natively, 114 ms by ATen's int4
    kernel, 10 ms for bfloat16 weights). The arithmetic is the float model's on the tiles' weights."""
    K = x.shape[-1]
    step = max(cpu_ops.TILE, TILES_CHUNK_BYTES // (K * x.element_size()) // cpu_ops.TILE * cpu_ops.TILE)
    if step >= out_features:
        return F.linear(x, weight_rows(0, out_features))
    out = x.new_empty(x.shape[0], out_features)
    for n0 in range(0, out_features, step):
        n1 = min(out_features, n0 + step)
        out[:, n0:n1] = F.linear(x, weight_rows(n0, n1))
    return out



class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel, or, with `groupsize`, one per group of inputs."""

    activation_bits = None  # 8: inputs rounded per token first (a QAT W8A8 checkpoint's record says so)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, groupsize=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        scales_shape = (out_features, in_features // groupsize) if groupsize else (out_features,)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(scales_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize=None) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, groupsize)
        module.weight, module.scales = quantize_int8(linear.weight.detach(), groupsize)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().float())
        return module

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) would round group scales (a GGUF's fp16 d) to bfloat16; keep them float32, so
        that the weights dequantized in forward are exactly those of the float model in the same dtype."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self.groupsize:
            self.scales = scales.to(self.scales.device)
        return self

    def prepare_for_device(self, dtype, choices=None):
        """Set up this device's paths; with `choices` (cpu_ops.KernelChoices), time them and keep the fastest."""
        if self.plain_weight().device.type != "cpu":
            self.paths = {}
            return
        if not self.groupsize:  # ATen's per-channel kernel takes its scales in the activations' dtype
            self.register_buffer("kernel_scales", self.scales.to(kernel_dtype(dtype)), persistent=False)
        # The native kernel needs weights within [-127, 127] (its sign trick without VNNI); a GGUF may hold a
        # -128. Its groups must be whole blocks of 32 activations (a Q6_K layer's groups of 16 are not).
        whole_blocks = self.in_features % cpu_ops.BLOCK == 0 and (self.groupsize or cpu_ops.BLOCK) % cpu_ops.BLOCK == 0
        if cpu_ops.load() and whole_blocks and self.plain_weight().min() > -128:
            for name, tensor in zip(("tiles", "tile_scales"), cpu_ops.int8_tiles(self.plain_weight(), self.scales)):
                self.register_buffer(name, tensor, persistent=False)
        self.paths = choose_paths(self, dtype, choices) if choices is not None else {}
        prefer_one_layout(self, dtype, choices)
        self.free_unchosen_tiles()

    def decode_tensors(self) -> list:
        """What one decoded token reads (memory.weight_bytes): the native kernel's tiles where it takes them."""
        native = one_token_path(self) == "native" and hasattr(self, "tiles")
        tensors = [self.tiles, self.tile_scales] if native else [self.plain_weight(), self.scales]
        return tensors + ([self.bias] if self.bias is not None else [])

    def free_unchosen_tiles(self):
        """One copy of the weights in memory: the native kernel's tiles (16 channels) are kept only where a path
        chosen here takes them; where every decoded width takes them, the plain [N, K] weights go instead, and
        prompts (weight-only paths) rebuild them from the tiles for the call (plain_weight)."""
        if not self.paths or not hasattr(self, "tiles"):
            return
        if not {"native", "tiles"} & set(self.paths.values()):
            del self.tiles, self.tile_scales
        elif all(self.paths[rows] == "native" for rows in ROW_BUCKETS[:-1]) and "weight" in self._buffers:
            del self.weight

    def __getattr__(self, name: str):
        if name == "weight" and "weight" not in self._buffers and "tiles" in self._buffers:
            return self.plain_weight()  # readers of .weight (shapes, Medusa's init, streaming) get the rebuilt copy
        return super().__getattr__(name)

    def plain_weight(self) -> Tensor:
        """[N, K] int8: the loaded weights, or a copy rebuilt from the native tiles where only those are kept."""
        if "weight" in self._buffers:
            return self._buffers["weight"]
        rows = self.tiles.view(-1, self.in_features // cpu_ops.BLOCK, 8, cpu_ops.TILE, 4).permute(0, 3, 1, 2, 4)
        return rows.reshape(-1, self.in_features)[: self.out_features]

    def path_names(self, rows) -> list:
        """The eager paths that can compute `rows` rows here, the default first."""
        # ATen's int8 kernel takes per-channel scales only, and its inputs in whole vectors: with an input width
        # that is not a multiple of 16 it reads past the end (a segmentation fault in torch 2.13, AVX-512).
        names = ["aten" if not self.groupsize and self.in_features % 16 == 0 else "dequant"]
        # Prompts keep the weight-only paths (the float model's arithmetic on the dequantized weights): rounding
        # a whole prompt's activations to int8 moved SmolLM2's int8 answer off "Paris". Decoded and verified
        # tokens (up to 8 rows) may take the native kernel, which rounds them per block of 32 as llama.cpp does.
        if hasattr(self, "tiles") and rows_bucket(rows) <= ROW_BUCKETS[-2]:
            names.append("native")
        elif hasattr(self, "tiles"):
            names.append("tiles")  # the tiles widened to the float weights for the float product (weight-only)
        return names

    def run_path(self, path: str, x: Tensor) -> Tensor:
        """y [rows, N] (no bias) for x [rows, K] by one path."""
        if path == "reduction":
            # As elementwise products and a sum, inductor fuses the dequantization (group scales included) into
            # one loop that reads the int8 weights once; compiled one-token use only (eager it is slow).
            weight = dequantize_int8(self.plain_weight(), self.scales) if self.groupsize else self.plain_weight().float()
            y = (x[..., None, :].float() * weight).sum(-1)
            return (y if self.groupsize else y * self.scales.float()).to(x.dtype)
        if path == "native":
            return cpu_ops.ops().int8_linear(x, self.tiles, self.tile_scales, self.groupsize or self.in_features,
                                             self.out_features)
        if path == "tiles":
            return linear_from_tiles(x, self.out_features, lambda n0, n1: cpu_ops.ops().int8_weight_rows(
                self.tiles, self.tile_scales, self.groupsize or self.in_features, self.in_features, self.out_features,
                n0, n1, x.dtype))
        if path == "aten":
            x2 = kernel_input(x)
            return torch.ops.aten._weight_int8pack_mm(x2, self.plain_weight(), self.kernel_scales.to(x2.dtype))
        if path == "dequant":
            # float32 dequantization rounded once: the product equals the float model's on the same weights.
            return F.linear(x, dequantize_int8(self.plain_weight(), self.scales).to(x.dtype))
        # CUDA: inductor fuses the dequantization into the matmul's prologue (group scales: into the weights)
        if self.groupsize:
            return F.linear(x, dequantize_int8(self.weight, self.scales).to(x.dtype))
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def native_weights(self):
        """(tiles, scales, scales, 1, groupsize): this layer as cpu_ops.cpp's block calls take it; None without
        the native tiles or where inputs are rounded first (QAT)."""
        if not hasattr(self, "tiles") or self.activation_bits:
            return None
        return self.tiles, self.tile_scales, self.tile_scales, 1, self.groupsize or self.in_features

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bits:
            x = fake_quantize_activations(x)
        y = self.run_path(path_for(self, x), x.reshape(-1, self.in_features)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(nn.Module):
    """int4 weights, asymmetric per group of inputs (quantize_int4), two per byte on disk. `groupsize` None: one
    group per output channel (self.groupsize is then in_features, which is how the native kernels take it)."""

    activation_bits = None  # as Int8Linear's

    def __init__(self, in_features: int, out_features: int, groupsize=None, bias: bool = False, device=None):
        super().__init__()
        groupsize = groupsize or in_features
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        groups = in_features // groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize=None) -> "Int4Linear":
        module = cls(linear.in_features, linear.out_features, groupsize, linear.bias is not None)
        q, module.scales, module.zeros = quantize_int4(linear.weight.detach(), groupsize)
        module.weight = pack_int4(q)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().float())
        return module

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) would round the scales and zeros to bfloat16 before they are packed (zero = m + 8d of
        a Q4_1 block loses its low bits: SmolLM2's logits moved 4% off the float model's); keep them float32."""
        kept = {name: self._buffers[name] for name in ("scales", "zeros") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def prepare_for_device(self, dtype, choices=None):
        """Pack the on-disk nibbles for this device's kernels; with `choices` (cpu_ops.KernelChoices), time the
        CPU paths and keep only the layouts of the ones chosen (one copy of the weights in memory, two at most)."""
        q = unpack_int4(self.weight)
        scales, zeros = self.scales, self.zeros
        # ATen's CPU kernel and CUDA's tinygemm take groups of 32-256 inputs only. A layer with other groups (one
        # per channel) keeps the file's layout for the "dequant" path (prompts) and decodes natively.
        aten_groups = self.groupsize in GROUP_SIZES
        if aten_groups or q.device.type != "cpu":
            del self.weight, self.scales, self.zeros  # the packed copies replace them
            # The ATen kernels take [groups, out_features, 2] (scale, zero) in the activations' dtype.
            scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", scales_and_zeros.to(kernel_dtype(dtype, q.device.type)),
                                 persistent=False)
        if q.device.type != "cpu":  # CUDA wants [N, K/2] bytes with the even column in the high nibble, then tiles
            self.paths = {}
            inner_k_tiles = [t for t in CUDA_INT4_INNER_K_TILES if self.in_features % (16 * t) == 0]
            if not aten_groups or not inner_k_tiles or self.out_features % 8:  # tinygemm cannot take it: dequantized
                self.register_buffer("dequantized", dequantize_int4(q, scales, zeros, self.groupsize).to(dtype),
                                     persistent=False)
                del self.scales_and_zeros
                return
            high_low = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(high_low.contiguous(),
                                                                                      inner_k_tiles[0]),
                                 persistent=False)
            return
        if aten_groups:  # (The CPU layout changed in torch 2.5; this is the newer one.)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                                 persistent=False)
        if cpu_ops.load() and self.in_features % cpu_ops.BLOCK == 0:
            for name, tensor in zip(("tiles", "tile_d", "tile_m"), cpu_ops.int4_tiles(q, scales, zeros)):
                self.register_buffer(name, tensor, persistent=False)
        self.paths = choose_paths(self, dtype, choices) if choices is not None else {}
        prefer_one_layout(self, dtype, choices)
        chosen = set(self.paths.values()) or {"aten"}
        if not {"native", "tiles"} & chosen and hasattr(self, "tiles"):
            del self.tiles, self.tile_d, self.tile_m
        if "aten" not in chosen and aten_groups:
            del self.packed, self.scales_and_zeros

    def decode_tensors(self) -> list:
        """What one decoded token reads (memory.weight_bytes): the layout of its one-token path."""
        names = {"native": ("tiles", "tile_d", "tile_m"), "aten": ("packed", "scales_and_zeros"),
                 "dequant": ("weight", "scales", "zeros")}.get(one_token_path(self), ())
        tensors = [getattr(self, name) for name in names if hasattr(self, name)] or list(self.buffers(recurse=False))
        return tensors + ([self.bias] if self.bias is not None else [])

    def path_names(self, rows) -> list:
        """The paths whose weight layouts this layer holds (prepare_for_device frees those not chosen); prompts
        keep a weight-only path (ATen's kernel, or the dequantized weights for groups it cannot take), as for
        int8 (so a layer that decodes natively holds two layouts)."""
        layouts = (("aten", "packed"), ("dequant", "weight"), ("native", "tiles"), ("tiles", "tiles"))
        names = [name for name, layout in layouts if hasattr(self, layout)]
        one_token_or_few = rows_bucket(rows) <= ROW_BUCKETS[-2]
        return [name for name in names if (name != "native" or one_token_or_few) and (name != "tiles" or not
                                                                                      one_token_or_few)] or names

    def run_path(self, path: str, x: Tensor) -> Tensor:
        if path == "native":
            return cpu_ops.ops().int4_linear(x, self.tiles, self.tile_d, self.tile_m, self.groupsize, self.out_features)
        if path == "tiles":
            return linear_from_tiles(x, self.out_features, lambda n0, n1: cpu_ops.ops().int4_weight_rows(
                self.tiles, self.tile_d, self.tile_m, self.groupsize, self.in_features, self.out_features, n0, n1,
                x.dtype))
        if hasattr(self, "dequantized"):
            return F.linear(x, self.dequantized.to(x.dtype))
        if path == "dequant":  # float32 dequantization rounded once, as Int8Linear's
            weight = dequantize_int4(unpack_int4(self.weight), self.scales, self.zeros, self.groupsize)
            return F.linear(x, weight.to(x.dtype))
        x2 = kernel_input(x)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.groupsize, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.groupsize, self.scales_and_zeros)

    def native_weights(self):
        """(tiles, d, m, 2, groupsize), as Int8Linear.native_weights."""
        if not hasattr(self, "tiles") or self.activation_bits:
            return None
        return self.tiles, self.tile_d, self.tile_m, 2, self.groupsize

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bits:
            x = fake_quantize_activations(x)
        y = self.run_path(path_for(self, x), x.reshape(-1, self.in_features)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class GatedFeedForward(FeedForward):
    """A feed-forward whose gate and up projections (w1, w3) are quantized layers of one kind and shape. Where
    both take the native kernel for a number of rows, and the measurement says it pays (choose_gated_paths),
    one native call computes silu(w1 x) * (w3 x) from both layers' tiles: one call and one pass over the
    threads where there were three (two products, then inductor's or ATen's elementwise kernel)."""

    gated_rows: frozenset = frozenset()  # the numbers of rows that take the one call

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()  # (a compiled token's int8 path may be inductor's reduction instead)
        if rows in self.gated_rows and x.device.type == "cpu" and path_for(self.w1, x) == path_for(self.w3, x) == "native":
            return self.w2(self.gated(x.reshape(-1, self.w1.in_features)).reshape(*x.shape[:-1], self.w1.out_features))
        return super().forward(x)

    def gated(self, x: Tensor) -> Tensor:
        w1, w3 = self.w1, self.w3
        if isinstance(w1, Int4Linear):
            return cpu_ops.ops().int4_gated_linear(x, w1.tiles, w1.tile_d, w1.tile_m, w3.tiles, w3.tile_d, w3.tile_m,
                                                   w1.groupsize, w1.out_features)
        return cpu_ops.ops().int8_gated_linear(x, w1.tiles, w1.tile_scales, w3.tiles, w3.tile_scales,
                                               w1.groupsize or w1.in_features, w1.out_features)

    def separate(self, x: Tensor) -> Tensor:
        """The same from the two layers' own calls (what the one call is timed against)."""
        return F.silu(self.w1.run_path("native", x)) * self.w3.run_path("native", x)


def gated_pair(module) -> bool:
    """A feed-forward whose w1 and w3 could share one native call: same quantized kind, shape and groups, both
    holding native tiles, no bias, no activation rounding."""
    if not isinstance(module, FeedForward):
        return False
    w1, w3 = module.w1, module.w3
    return (type(w1) is type(w3) and isinstance(w1, (Int8Linear, Int4Linear)) and hasattr(w1, "tiles")
            and hasattr(w3, "tiles") and (w1.in_features, w1.out_features, w1.groupsize) ==
            (w3.in_features, w3.out_features, w3.groupsize) and w1.bias is None and w3.bias is None
            and not w1.activation_bits and not w3.activation_bits)


@torch.no_grad()
def choose_gated_paths(model: nn.Module, dtype, choices):
    """Each feed-forward whose w1 and w3 both take the native kernel for some numbers of rows becomes a
    GatedFeedForward; for those rows, the one call is timed against the two calls and the elementwise product
    (cached in `choices`), and kept where faster."""
    for module in [m for m in model.modules() if gated_pair(m)]:
        module.__class__ = GatedFeedForward
        rows_native = [rows for rows in ROW_BUCKETS[:-1]
                       if module.w1.paths.get(rows) == "native" and module.w3.paths.get(rows) == "native"]
        gated = set()
        for rows in rows_native:
            x = torch.randn(rows, module.w1.in_features, dtype=dtype)
            timers = {name: (lambda name=name: cpu_ops.time_call(lambda: getattr(module, name)(x)))
                      for name in ("gated", "separate")}
            if choices.choose(f"{path_key(module.w1, dtype)} gated rows {rows}", timers) == "gated":
                gated.add(rows)
        module.gated_rows = frozenset(gated)


# ---------------------------------------------------------------- choosing a path per machine

# Rows a quantized layer is timed at: one decoded token, each verification width of drafted decoding, and a
# prompt's worth (standing for every longer input).
ROW_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 64)


def rows_bucket(rows) -> int:
    return rows if isinstance(rows, int) and rows <= ROW_BUCKETS[-2] else ROW_BUCKETS[-1]


def path_for(module, x: Tensor) -> str:
    """The path `module` takes for input `x`: the measured choice for its number of rows where one was made,
    else the built-in default (the fused reduction for one compiled token on CPU, the first eager path else)."""
    rows = x.shape[:-1].numel()
    if x.device.type != "cpu":
        return "cuda"
    if rows == 1 and torch.compiler.is_compiling() and "compiled" in module.paths:
        return module.paths["compiled"]
    if module.paths:
        return module.paths[rows_bucket(rows)]
    if rows == 1 and torch.compiler.is_compiling() and isinstance(module, Int8Linear):
        return "reduction"
    return module.path_names(rows)[0]


def one_token_path(module) -> str:
    """The path a decoded token takes: the compiled choice, else the eager one for one row, else the default."""
    if module.paths:
        return module.paths.get("compiled", module.paths[1])
    return "reduction" if isinstance(module, Int8Linear) else module.path_names(1)[0]


def path_key(module, dtype=None) -> str:
    """'int8 per-channel 1536x576 bfloat16': what a path choice depends on (with the activations' dtype)."""
    kind = "int4" if isinstance(module, Int4Linear) else "int8"
    per_channel = not module.groupsize or (kind == "int4" and module.groupsize == module.in_features)
    group = "per-channel" if per_channel else f"g{module.groupsize}"
    key = f"{kind} {group} {module.out_features}x{module.in_features}"
    return key if dtype is None else f"{key} {str(dtype).removeprefix('torch.')}"


def kernel_paths_summary(models: list) -> list:
    """One line per distinct quantized layer shape: which path each number of rows takes on this machine."""
    lines = {}
    for module in (m for model in models for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))):
        key = path_key(module)
        lines.setdefault(key, f"{key}: {cpu_ops.describe_paths(module.paths, ROW_BUCKETS)}")
    for module in (m for model in models for m in model.modules() if isinstance(m, GatedFeedForward)):
        key = f"{path_key(module.w1)} gate and up"
        rows = {r: "one call" if r in module.gated_rows else "two calls" for r in ROW_BUCKETS[:-1]}
        lines.setdefault(key, f"{key}: {cpu_ops.describe_paths({**rows, ROW_BUCKETS[-1]: 'two calls'}, ROW_BUCKETS)}")
    return list(lines.values())


@torch.no_grad()
def choose_paths(module, dtype, choices) -> dict:
    """{rows bucket: path} for `module`, each the fastest of its eager paths at that many rows (cached)."""
    key = path_key(module, dtype)
    paths = {}
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, module.in_features, dtype=dtype)
        timers = {name: (lambda name=name: cpu_ops.time_call(lambda: module.run_path(name, x)))
                  for name in module.path_names(rows)}
        paths[rows] = choices.choose(f"{key} rows {rows}", timers)
    return paths


LAYOUT_MARGIN = 1.15  # a path that needs a second copy of a layer's weights must be this much faster to keep it


def prefer_one_layout(module, dtype, choices):
    """Where the native tiles are kept for some rows (decoded tokens natively, prompts widened from them), the
    rows that chose another layout's path (ATen's int4 packing, int8's plain [N, K] weights) take the tiles'
    path instead unless that path was measured more than LAYOUT_MARGIN slower: a second layout costs the
    layer's weights again in memory (1.7B int4: 755 MB of ATen packing beside 805 MB of tiles) for a few
    percent that two timings a second apart on a shared VM do not separate."""
    if (not hasattr(choices, "time_of") or not module.paths  # (a stand-in that forces one path has no times)
            or not {"native", "tiles"} & set(module.paths.values())):
        return
    key = path_key(module, dtype)
    for rows, path in module.paths.items():
        own = "native" if rows_bucket(rows) <= ROW_BUCKETS[-2] else "tiles"
        if path in ("native", "tiles") or own not in module.path_names(rows):
            continue
        chosen, tiles = choices.time_of(f"{key} rows {rows}", path), choices.time_of(f"{key} rows {rows}", own)
        if chosen and tiles and tiles <= chosen * LAYOUT_MARGIN:
            module.paths[rows] = own


@torch.no_grad()
def choose_compiled_paths(models: list, dtype, choices):
    """For one compiled token, an int8 layer has one more candidate: inductor's fused dequantize-and-reduce
    (run_path "reduction"), timed compiled, against the eager choice for one row (the same call in the graph)."""
    layers = [m for model in models for m in model.modules() if isinstance(m, Int8Linear) and m.paths]
    for module in tqdm(layers, desc="timing compiled paths", unit="layer", leave=False,
                       disable=all(f"{path_key(m, dtype)} rows 1 compiled" in choices.choices for m in layers)):
        key, eager = path_key(module, dtype), module.paths[1]
        x = torch.randn(1, module.in_features, dtype=dtype)
        timers = {"reduction": lambda: cpu_ops.time_compiled(lambda x: module.run_path("reduction", x), x),
                  eager: lambda: choices.time_of(f"{key} rows 1", eager) or
                  cpu_ops.time_call(lambda: module.run_path(eager, x))}
        module.paths["compiled"] = choices.choose(f"{key} rows 1 compiled", timers)
        module.free_unchosen_tiles()
    choices.save()


# ---------------------------------------------------------------- GPTQ


def gptq_quantize(weight: Tensor, hessian: Tensor, groupsize=None, blocksize: int = 128, damping: float = 0.01):
    """GPTQ (Frantar et al. 2022): quantize column by column, pushing each column's rounding error onto the
    columns not yet quantized through the inverse Hessian of the layer's inputs, so that the layer's output
    on the calibration data, not its weights, stays close. Returns q [N, K] (0..15), scales, zeros [N, K/g]
    (groupsize None: one group per output channel, its range taken from the weights before any update)."""
    W = weight.float().clone()
    out_features, in_features = W.shape
    groupsize = groupsize or in_features
    H = hessian.clone()
    dead = torch.diag(H) == 0  # inputs never seen in calibration: their weights cannot matter there
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damping * torch.mean(torch.diag(H)) * torch.eye(in_features)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros(out_features, in_features, dtype=torch.uint8)
    scales = torch.zeros(out_features, in_features // groupsize)
    zeros = torch.zeros_like(scales)
    for start in range(0, in_features, blocksize):
        end = min(start + blocksize, in_features)
        block, errors, Hinv_block = W[:, start:end].clone(), torch.zeros(out_features, end - start), Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % groupsize == 0:  # the group's range from its columns as they are now, errors included
                group = column // groupsize  # (a group wider than the block: its later columns as W has them)
                columns = torch.cat([block[:, i:i + groupsize], W[:, end:column + groupsize]], dim=1)
                scales[:, group], zeros[:, group] = int4_group_params(columns)
            scale, zero = scales[:, column // groupsize], zeros[:, column // groupsize]
            w = block[:, i]
            code = int4_codes(w, scale, zero)
            q[:, column] = code.to(torch.uint8)
            error = (w - ((code - 8) * scale + zero)) / Hinv_block[i, i]
            block[:, i:] -= error[:, None] * Hinv_block[i, i:][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return q, scales, zeros


@torch.no_grad()
def collect_hessians(model: Transformer, names: list, sequences: list) -> dict:
    """2/n * sum X^T X of each named linear's inputs over the calibration sequences (float32)."""
    hessians, counts, hooks = {}, {}, []

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name not in hessians:
                hessians[name], counts[name] = torch.zeros(x.shape[1], x.shape[1]), 0
            n = counts[name] + x.shape[0]
            hessians[name] *= counts[name] / n
            hessians[name] += (2 / n) * x.T @ x
            counts[name] = n
        return accumulate

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model.setup_caches(1, max(len(s) for s in sequences))
        for tokens in tqdm(sequences, desc="calibration", unit="sequence"):
            model(tokens[None], torch.arange(len(tokens)))
    finally:
        for handle in hooks:
            handle.remove()
    return hessians


def calibration_sequences(model: Transformer, tokenizer_dir: Path, calibration_file=None, samples: int = 16,
                          length: int = 256, seed: int = 0) -> list:
    """Token sequences from a text file, or, without one, text the model writes itself (self_generated_text)."""
    if calibration_file is not None:
        ids = torch.tensor(load_tokenizer(tokenizer_dir).encode(Path(calibration_file).read_text(errors="replace")))
        return [ids[i:i + length] for i in range(0, len(ids) - 1, length)][:samples]
    print(f"writing {samples} calibration samples of {length} tokens (no --calibration_file given)", file=sys.stderr)
    return list(self_generated_text(model, samples, length, seed))


@torch.no_grad()
def self_generated_text(model: Transformer, samples: int, length: int, seed: int = 0, greedy_tokens=(0, 0),
                        progress: bool = True) -> Tensor:
    """[samples, length] tokens the model writes itself from random first tokens, all rows in one batch: the
    data-free data of LLM-QAT (Liu et al. 2023). Each row's next n tokens are its greedy choices, n drawn per row
    from greedy_tokens (low, high) (LLM-QAT: 3-5), and the rest sampled at temperature 1. GPTQ calibrates on
    it (sampled throughout) so that it fits the model's own distribution; scripts/qat.py trains on it."""
    generator = torch.Generator().manual_seed(seed)
    device = model.norm.weight.device
    tokens = torch.randint(0, model.args.vocab_size, (samples, 1), generator=generator)
    greedy_until = torch.randint(greedy_tokens[0], greedy_tokens[1] + 1, (samples, 1), generator=generator)
    tokens, greedy_until = tokens.to(device), greedy_until.to(device)
    model.setup_caches(samples, length)
    for position in tqdm(range(length - 1), desc="self-generated text", unit="token", disable=not progress):
        logits = model(tokens[:, -1:], torch.tensor([position], device=device))[:, -1].float()
        sampled = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).to(device)
        next_token = torch.where(position < greedy_until, logits.argmax(dim=-1, keepdim=True), sampled)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


# ---------------------------------------------------------------- quantization-aware training (scripts/qat.py)


class QATLinear(nn.Linear):
    """A float Linear that computes with its weights rounded as `kind` ("int8" / "int4", `groupsize`) rounds
    them, and optionally with 8-bit per-token inputs; the straight-through estimator passes the gradient to the
    float weights unchanged (LLM-QAT). Its float weights are what quantize_checkpoint's rounding then packs."""

    def __init__(self, linear: nn.Linear, kind: str, groupsize=None, activation_bits=None):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared: a tied output keeps its embedding
        self.kind, self.groupsize, self.activation_bits = kind, groupsize, activation_bits

    def forward(self, x: Tensor) -> Tensor:
        weight = RoundedThrough.apply(self.weight, lambda w: fake_quantize_weight(w, self.kind, self.groupsize))
        if self.activation_bits:
            x = RoundedThrough.apply(x, fake_quantize_activations)
        return F.linear(x, weight, self.bias)


class RoundedThrough(torch.autograd.Function):
    """rounding(x) forward, the identity backward: the straight-through estimator in one op (`x + (r - x).detach()`
    would cost two more passes over every weight per step)."""

    @staticmethod
    def forward(ctx, x: Tensor, rounding) -> Tensor:
        return rounding(x.detach()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class FakeQuantKV(nn.Module):
    """Stands in for an Attention's KVCache while training on whole sequences: stores nothing, returns the
    keys and values rounded as the int8 KV cache rounds them (per token and head), straight through."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        def rounding(t):
            q, scales = quantize_kv(t)
            return q * scales
        return RoundedThrough.apply(k, rounding), RoundedThrough.apply(v, rounding)


def swap_for_qat(model: Transformer, quantization: dict, activation_bits=None) -> int:
    """Replace the linears the plan quantizes by QATLinear modules (sharing their parameters), in place."""
    names = [name for name, kind in quantization["layers"].items() if kind != "float"]
    for name in names:
        kind = quantization["layers"][name]
        groupsize = quantization["groupsize"] if kind == "int4" else quantization.get("int8_groupsize")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QATLinear(model.get_submodule(name), kind, groupsize, activation_bits))
    return len(names)


def linears_from_qat(model: Transformer):
    """QATLinear modules back to plain Linears with the trained weights (then swap_linears quantizes them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


# ---------------------------------------------------------------- whole models


def linear_names(model: Transformer) -> list:
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


OUTPUT_KINDS = ("int8", "int4")


def plan(model: Transformer, mode: str, groupsize: int, int8_groupsize=None, refuse_if_none: bool = False,
         output_kind: str = "int8") -> dict:
    """What each linear becomes: {name: "int8" | "int4" | "float"} with the reason for any that stays float.

    int8 layers have one scale per output channel, or per `int8_groupsize` inputs when that is given (the
    record's "int8_groupsize"; files without that key are per channel). The output projection is int8, or
    int4 with output_kind "int4" (int4 modes only). refuse_if_none: a UsageError when no layer but the
    output can take the group size."""
    if output_kind == "int4" and mode == "int8":
        raise UsageError("--output_projection int4 needs an int4 --mode (int8 mode has no int4 group size)")
    layers, skipped = {}, {}
    for name in linear_names(model):
        module = model.get_submodule(name)
        kind = "int8" if mode == "int8" or (name == "output" and output_kind == "int8") else "int4"
        group = int8_groupsize if kind == "int8" else groupsize
        if group and module.in_features % group:
            layers[name], skipped[name] = "float", f"in_features {module.in_features} is not a multiple of group size {group}"
        elif kind == "int4" and module.out_features % 8:
            layers[name], skipped[name] = "float", f"out_features {module.out_features} is not a multiple of 8 (int4 kernels)"
        else:
            layers[name] = kind
    if refuse_if_none and all(kind == "float" for name, kind in layers.items() if name != "output"):
        raise UsageError(f"no layer of this model can take group size {groupsize}: {next(iter(skipped.values()))}; "
                         "choose another --groupsize")
    return {"mode": mode, "groupsize": groupsize if mode != "int8" else int8_groupsize,
            "int8_groupsize": int8_groupsize, "layers": layers, "skipped": skipped}


def swap_linears(model: Transformer, quantization: dict, quantize_weights: bool = False, hessians=None,
                 blocksize: int = 128, damping: float = 0.01, source=None):
    """Replace the linears named in the plan, in place: with empty modules (to be loaded from a quantized
    checkpoint `source`) or, with quantize_weights, with modules quantized from the float weights they replace
    (int4 layers by GPTQ where `hessians` has theirs, else by rounding to nearest)."""
    # "layer_groupsizes" (GGUF imports): an int8 group size of a layer's own, e.g. 16 for a Q6_K tensor.
    own_groupsizes = quantization.get("layer_groupsizes") or {}
    if source is not None:  # a record read from a file: a layer it names must be one of the model's linears
        unknown = [name for name in [*quantization["layers"], *own_groupsizes] if name not in linear_names(model)]
        groupsizes = {quantization.get("groupsize"), quantization.get("int8_groupsize")} - {None}
        if unknown or not groupsizes <= set(GROUP_SIZES) or not set(own_groupsizes.values()) <= {16, *GROUP_SIZES}:
            what = f"names {unknown[0]!r}, not a linear of this model" if unknown else \
                f"has group size {groupsizes | set(own_groupsizes.values())}"
            raise CheckpointError(f"{source}: its quantization record {what}; quantize the float checkpoint again")
    names = [name for name, kind in quantization["layers"].items() if kind != "float"]
    for name in tqdm(names, desc=f"quantizing to {quantization['mode']}", unit="layer", disable=not quantize_weights):
        kind = quantization["layers"][name]
        int8_groupsize = own_groupsizes.get(name, quantization.get("int8_groupsize"))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = model.get_submodule(name)
        if quantize_weights and kind == "int4" and hessians is not None:
            new = Int4Linear.from_linear(old, quantization["groupsize"])
            q, new.scales, new.zeros = gptq_quantize(old.weight.detach(), hessians[name], quantization["groupsize"],
                                                     blocksize, damping)
            new.weight = pack_int4(q)
        elif quantize_weights:
            new = Int8Linear.from_linear(old, int8_groupsize) if kind == "int8" else \
                Int4Linear.from_linear(old, quantization["groupsize"])
        elif kind == "int8":
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, int8_groupsize, device="meta")
        else:
            new = Int4Linear(old.in_features, old.out_features, quantization["groupsize"], old.bias is not None, device="meta")
        if quantization.get("activation_bits"):
            new.activation_bits = quantization["activation_bits"]
        setattr(parent, child, new)
    return len(names)


def prepare_for_device(model: nn.Module, dtype, choose: bool = True):
    """Pack every quantized layer for its device; on CPU, with `choose`, time each layer's paths (once per
    machine: cpu_ops.KernelChoices caches the choices on disk) and keep the fastest."""
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    choices = cpu_ops.KernelChoices() if choose and layers and layers[0].weight.device.type == "cpu" else None
    cached = choices is None or all(f"{path_key(m, dtype)} rows {rows}" in choices.choices
                                    for m in layers for rows in ROW_BUCKETS)
    for module in tqdm(layers, desc="timing kernel paths", unit="layer", leave=False, disable=cached):
        module.prepare_for_device(dtype, choices)
    if choices is not None:
        choose_gated_paths(model, dtype, choices)
        choices.save()
    return choices


def quantize_checkpoint(path: Path, mode: str, groupsize: int, calibration_file=None, calibration_samples: int = 16,
                        calibration_length: int = 256, blocksize: int = 128, damping: float = 0.01,
                        int8_groupsize=None, output_kind: str = "int8") -> Path:
    """`groupsize` is the int4 modes' (ignored by int8); `int8_groupsize` makes mode int8 grouped, not per channel;
    output_kind "int4" quantizes the output projection to int4 too (the file name says `.output_int4`)."""
    start = time.perf_counter()
    ckpt = checkpoint.load(path)
    if ckpt.quantization:
        raise UsageError(f"{path} is already quantized ({ckpt.quantization['mode']}); quantize the float checkpoint")
    args = ckpt.args
    with torch.device("meta"):
        model = Transformer(args)
    checkpoint.load_into(model, ckpt)
    if mode == "int8":
        groupsize = int8_groupsize  # names the file and the summary below
    quantization = plan(model, mode, groupsize, int8_groupsize if mode == "int8" else None, refuse_if_none=True,
                        output_kind=output_kind)
    hessians = None
    if mode == "int4-gptq":
        if calibration_file is not None and not Path(calibration_file).is_file():
            raise UsageError(f"calibration file {calibration_file} not found")
        if groupsize and blocksize % groupsize:
            raise UsageError(f"--blocksize {blocksize} must be a multiple of --groupsize {groupsize}")
        model = model.float()  # calibration and GPTQ's algebra in float32
        sequences = calibration_sequences(model, path.parent, calibration_file, calibration_samples, calibration_length)
        int4_names = [name for name, kind in quantization["layers"].items() if kind == "int4"]
        hessians = collect_hessians(model, int4_names, sequences)
        quantization.update(calibration=str(calibration_file or "self-generated"), damping=damping, blocksize=blocksize,
                            calibration_tokens=sum(len(s) for s in sequences))
    count = swap_linears(model, quantization, quantize_weights=True, hessians=hessians, blocksize=blocksize,
                         damping=damping)
    state_dict = model.state_dict()
    suffix = (f"{mode}.g{groupsize}" if groupsize else mode) + (".output_int4" if output_kind == "int4" else "")
    output = path.with_name(f"{path.stem}_{suffix}.pth")
    checkpoint.save(output, args, state_dict, quantization)
    before, after = path.stat().st_size, output.stat().st_size
    if mode != "int8":
        detail = f" ({f'group size {groupsize}' if groupsize else 'per output channel'}; " \
                 f"output projection {quantization['layers'].get('output', 'absent')})"
    else:
        detail = f" (group size {groupsize})" if groupsize else " (per output channel)"
    print(f"Quantized {count} linears to {mode}{detail} "
          f"in {time.perf_counter() - start:.1f} s: {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB -> {output}")
    for name, reason in quantization["skipped"].items():
        print(f"  left in float: {name} ({reason})")
    return output


def run(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, quantization = parser.add_argument_group("model"), parser.add_argument_group("quantization")
    model.add_argument("--checkpoint_path", type=Path, required=True, help="the model.pth to quantize")
    quantization.add_argument("--mode", choices=["int8", "int4", "int4-gptq"], required=True)
    quantization.add_argument("--groupsize", type=groupsize_arg, metavar="{32,64,128,256,channel}",
                              help="int4: inputs per group (default 32), or `channel`: one group per output channel "
                                   "(model_int4.pth); int8: one scale per group of this many inputs instead of one "
                                   "per output channel (the default)")
    quantization.add_argument("--output_projection", choices=OUTPUT_KINDS, default="int8",
                              help="int4 modes: the output projection's kind (int4 as llama.cpp's Q4_0; default int8: "
                                   "better quality, more bytes per token)")
    quantization.add_argument("--calibration_file", type=Path,
                              help="int4-gptq: text to calibrate on (default: text the model writes)")
    quantization.add_argument("--calibration_samples", type=int, default=16, help="int4-gptq: number of sequences")
    quantization.add_argument("--calibration_length", type=int, default=256, help="int4-gptq: tokens per sequence")
    quantization.add_argument("--blocksize", type=int, default=128, help="int4-gptq: columns updated together")
    quantization.add_argument("--damping", type=float, default=0.01, help="int4-gptq: fraction of mean diag(H) added to H")
    args = parser.parse_args(argv)
    if args.calibration_samples < 1 or args.calibration_length < 2 or args.blocksize < 1 or not 0 <= args.damping < 1:
        parser.error("need --calibration_samples >= 1, --calibration_length >= 2, --blocksize >= 1, 0 <= --damping < 1")
    int4_groupsize = 32 if args.groupsize is None else args.groupsize or None  # PER_CHANNEL -> None
    quantize_checkpoint(args.checkpoint_path, args.mode, int4_groupsize, args.calibration_file,
                        args.calibration_samples, args.calibration_length, args.blocksize, args.damping,
                        int8_groupsize=args.groupsize or None, output_kind=args.output_projection)


def main(argv=None):
    cli.run(run, argv)


if __name__ == "__main__":
    main()
