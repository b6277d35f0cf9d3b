"""One compact decoder-only transformer for Llama, Mistral and Qwen checkpoints.

Every family is a config difference: qkv bias (Qwen2), per-head q/k RMSNorm and an explicit
head_dim (Qwen3), a sliding attention window (Mistral, Qwen2 when enabled), rope scaling
(Llama 3.1 `llama3`, `linear`), tied input/output embeddings (Llama 3.2, SmolLM2, small Qwens).
Weights are kept in the HF layout (q/k rows in "rotate half" order) so numerics follow
HF transformers, which is our oracle. No I/O and no CLI live here.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1  # key/value heads (GQA); -1 means n_head
    head_dim: int = 0  # 0 means dim // n_head
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope parameters: {"rope_type": "llama3"|"linear", "factor": ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None  # per layer "full_attention" | "sliding_attention"

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.n_layer
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Shape from a HF `config.json` (Llama, Mistral, Qwen2, Qwen3), old or new rope layout."""
        # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_base = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, llama3, linear)")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

        model_type = cfg.get("model_type", "llama")
        n_layer = cfg["num_hidden_layers"]
        sliding_window, layer_types = cfg.get("sliding_window"), cfg.get("layer_types")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window size that is off unless use_sliding_window
        if sliding_window and layer_types is None and model_type in ("qwen2", "qwen3"):
            first = cfg.get("max_window_layers", n_layer)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
        if not sliding_window:
            layer_types = None
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layer=n_layer,
            n_head=cfg["num_attention_heads"],
            n_local_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_base=float(rope_base),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window or None,
            layer_types=layer_types,
        )


class KVCache(nn.Module):
    """Static cache: [batch, kv_heads, max_seq_length, head_dim], written in place at input_pos.

    Quantized (`quantized=True`): int8 entries and a float32 scale per token and head (the head's largest
    magnitude / 127, rounded to nearest), about half a 16-bit cache's bytes (1 + 4 / head_dim per value). update
    returns the whole cache dequantized in the activations' dtype, so attention, prefill, decode and drafted
    verification read it as they read a float cache; a token's own keys and values are rounded before it
    attends to them, as every later token sees them."""

    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype, quantized: bool = False):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.quantized = quantized
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.int8 if quantized else dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.int8 if quantized else dtype), persistent=False)
        if quantized:
            self.register_buffer("k_scales", torch.zeros(shape[:-1] + (1,)), persistent=False)
            self.register_buffer("v_scales", torch.zeros(shape[:-1] + (1,)), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor):
        # The cache is allocated for max_batch_size; a smaller batch uses its first rows.
        bsz = k_val.shape[0]
        k_out, v_out = self.k_cache[:bsz], self.v_cache[:bsz]
        if not self.quantized:
            k_out.index_copy_(2, input_pos, k_val)
            v_out.index_copy_(2, input_pos, v_val)
            return k_out, v_out
        k_scales, v_scales = self.write(input_pos, k_val, v_val)
        return (k_out * k_scales).to(k_val.dtype), (v_out * v_scales).to(v_val.dtype)

    def write(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple:
        """Quantized cache: round and store the new entries; the batch's (k_scales, v_scales). Attention that
        reads int8 entries and their scales itself (decode_kernels.DecodeAttention) calls this instead of update."""
        bsz = k_val.shape[0]
        k_scales, v_scales = self.k_scales[:bsz], self.v_scales[:bsz]
        for values, cache, scales in ((k_val, self.k_cache[:bsz], k_scales), (v_val, self.v_cache[:bsz], v_scales)):
            quantized, scale = quantize_kv(values)
            cache.index_copy_(2, input_pos, quantized)
            scales.index_copy_(2, input_pos, scale)
        return k_scales, v_scales

    def move(self, source: Tensor, destination: Tensor):
        """Copy the entries at slots `source` to slots `destination` (Medusa keeps the accepted tree path)."""
        for cache in self.buffers():  # the scales of a quantized cache move with their entries
            cache.index_copy_(2, destination, cache.index_select(2, source))


def quantize_kv(values: Tensor) -> tuple:
    """Symmetric int8 per token and head: (int8 values, float32 scales [..., 1]) with values ~ int8 * scale."""
    values = values.float()
    scales = values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(values / scales).clamp(-127, 127).to(torch.int8), scales


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the weight, as HF does: this is what makes 16-bit runs agree.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        total = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        # q, k and v in one matmul: one weight read per token instead of three launches.
        self.wqkv = nn.Linear(args.dim, total, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.sliding = args.layer_types[layer_id] == "sliding_attention"
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: tuple, mask: Tensor, cache_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, *rope), apply_rotary_emb(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = self.attend_through_cache(q, k, v, mask, cache_pos)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))

    def attend_through_cache(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cache_pos: Tensor) -> Tensor:
        """Store this step's k and v in the cache, then attend over all it holds."""
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)
        return self.attend(q, k, v, mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [batch, heads, seq, head_dim]; k, v [batch, kv_heads, cache_len, head_dim] as the cache holds them."""
        # enable_gqa shares each KV head across its query group without copying the cache.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_head)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, cache_pos):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.kv_cache_dtype: Optional[torch.dtype] = None  # None: the model's dtype; torch.int8: quantized
        self.cache_quantized = False

    def tie_weights(self):
        """Re-tie after load_state_dict(assign=True), which replaces the shared Parameter.
        An output projection swapped for another module (a quantized copy) keeps its own weights."""
        if self.args.tie_word_embeddings and type(self.output) is nn.Linear:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache (in the model's dtype, or int8 where `kv_cache_dtype` says so), the rope tables
        and the masks; a cache that is already as large is kept."""
        quantized = self.kv_cache_dtype == torch.int8
        if (self.max_batch_size >= max_batch_size and self.max_seq_length == max_seq_length
                and self.cache_quantized == quantized):
            return
        self.max_batch_size, self.max_seq_length, self.cache_quantized = max_batch_size, max_seq_length, quantized
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, attention.n_local_heads, attention.head_dim, dtype, quantized
            ).to(device)
        cos, sin = precompute_rope(max_seq_length, self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        if self.args.sliding_window:
            pos = torch.arange(max_seq_length, device=device)
            window = pos[None, :] > pos[:, None] - self.args.sliding_window  # key > query - window, as HF
            self.register_buffer("window_mask", window, persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None,
                cache_pos: Optional[Tensor] = None, return_hidden: bool = False, last_only: bool = False):
        """Logits for tokens `idx` [batch, seq] at positions `input_pos` [seq], their K/V written to the
        cache slots `cache_pos` (default: the same as the positions).

        With no mask, each token attends causally to the cache (the rows of the causal mask at
        input_pos). Drafting passes its own [.., seq, max_seq_length] mask instead: Medusa's tree
        nodes sit at depth-based positions but in slots of their own, so slots and positions differ.
        With return_hidden, also the final normed hidden state (what Medusa heads read). With last_only, the
        logits (and hidden state) of the last position only: a prompt's prefill samples from nothing else, and
        the output product of every position is a fifteenth of a 1.7B model's prefill.
        """
        dtype = self.tok_embeddings.weight.dtype
        rope = (self.rope_cos[input_pos].to(dtype), self.rope_sin[input_pos].to(dtype))
        full_mask = self.causal_mask[None, None, input_pos] if mask is None else mask
        sliding_mask = None
        if self.args.sliding_window:  # the window is counted from each token's position, whatever its slot
            sliding_mask = full_mask & self.window_mask[None, None, input_pos]
        cache_pos = input_pos if cache_pos is None else cache_pos
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, sliding_mask if layer.attention.sliding else full_mask, cache_pos)
        hidden = self.norm(x[:, -1:] if last_only else x)
        logits = self.output(hidden)
        return (logits, hidden) if return_hidden else logits


def rope_inverse_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies exactly as HF computes them, including llama3 and linear scaling."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def precompute_rope(seq_len: int, args: ModelArgs, device=None):
    """cos/sin tables [seq_len, head_dim] in float32, halves repeated as HF's rotate_half expects."""
    inv_freq = rope_inverse_frequencies(args).to(device)
    freqs = torch.arange(seq_len, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [seq, head_dim]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
