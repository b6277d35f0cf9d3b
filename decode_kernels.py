"""Decode-time kernel paths: how one decoded token's products are computed under torch.compile, per device.

On CPU one decoded token is a chain of matrix-vector products. `use_decode_kernels` swaps each plain Linear
for DecodeLinear and each Attention for DecodeAttention, whose one-token cases are written as elementwise
products and sums that inductor fuses into vectorised loops (the README's "Why the CPU decode is fast" has
the measurements). Quantized modules (quantize.py) keep their own one-token paths. Longer inputs (prefill,
verification of several drafted tokens) take the ordinary matmul and SDPA, and so does eager mode, so that
the classes can be swapped while an eager step runs (compiled_step.py builds the compiled one meanwhile).
"""
import torch
from torch import Tensor

import cpu_ops
import memory
from model import Attention, FeedForward, TransformerBlock


class DecodeLinear(torch.nn.Linear):
    """A Linear with paths for one decoded token and for a few verified ones, for torch.compile on CPU.

    "reduction": `(x * W).sum(-1)`, which inductor turns into one vectorised C++ loop that reads the 16-bit
    weights once, widens them in registers and accumulates in float32 (one row only). "native": cpu_ops.cpp's
    kernel, which does the same and, for up to 8 rows, multiplies each weight it has read with every row, so
    verifying several drafted tokens costs about as much as one. "linear": oneDNN's matmul (ATen). Which one
    each number of rows takes is measured on the running machine (`choose_float_paths`); unmeasured, one row
    takes the reduction and more rows the matmul.
    """

    paths: dict = {}
    MAX_ROWS = 8  # longer inputs (prompts) take the matmul

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # eager: the matmul (compiled_step.py swaps classes under it)
            return super().forward(x)
        rows = x.shape[:-1].numel()
        path = self.paths.get(rows, "reduction" if rows == 1 else "linear") if rows <= self.MAX_ROWS else "linear"
        return self.run_path(path, x)

    def run_path(self, path: str, x: Tensor) -> Tensor:
        if path == "reduction":
            y = (x[..., None, :].float() * self.weight.float()).sum(-1)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        if path == "native":
            y = cpu_ops.ops().float_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def native_weights(self):
        """(a, b, c, kind, groupsize): this layer as cpu_ops.cpp's block calls take it (kind 0, a float weight)."""
        return self.weight, self.weight, self.weight, 0, 0


class DecodeAttention(Attention):
    """Attention with paths for one decoded token and a few verified ones, for torch.compile on CPU.

    "native": cpu_ops.cpp's kernel, which per query row and head skips the cache positions the mask hides (a
    causal decode at position p reads p + 1 cached rows, not the whole cache) and runs the softmax in vector
    registers. "reduction" (one row): the product and sums written as elementwise ops that inductor fuses into
    its own loops (query heads grouped over their KV head, so the cache is read as it is). "sdpa": ATen's
    scaled_dot_product_attention. Which each number of rows takes is measured on the running machine
    (choose_attention_paths); unmeasured, one row takes the reduction and more rows SDPA. Eager mode is SDPA.
    Measured (Zen 4, 2 cores, SmolLM2's 9 heads over 3 KV heads): with all of a 512-slot cache attended to,
    native 20 us, the reduction 79 us, SDPA 377 us; in the int4 step (20 positions of a 512-slot cache) native
    11-16 us a layer where the reduction took 77 us, 10.2 instead of 11.3-11.9 ms a token.
    """

    paths: dict = {}
    # An int8 KV cache (model.KVCache quantized): rows -> "native" (cpu_ops.cpp reads the int8 entries and their
    # scales where the mask lets it through) or "dequantize" (the whole cache dequantized into a copy by
    # KVCache.update, then attended as a float cache): measured by choose_attention_paths.
    int8_cache_paths: dict = {}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        rows = q.shape[2]
        if rows > DecodeLinear.MAX_ROWS or not torch.compiler.is_compiling():
            return super().attend(q, k, v, mask)
        return self.run_path(self.paths.get(rows, "reduction" if rows == 1 else "sdpa"), q, k, v, mask)

    def attend_through_cache(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cache_pos: Tensor) -> Tensor:
        cache = self.kv_cache
        if (getattr(cache, "quantized", False) and torch.compiler.is_compiling()
                and self.int8_cache_paths.get(q.shape[2]) == "native"):
            return self.native_int8_cache(q, k, v, mask, cache_pos)
        return super().attend_through_cache(q, k, v, mask, cache_pos)

    def native_int8_cache(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cache_pos: Tensor) -> Tensor:
        cache, batch = self.kv_cache, q.shape[0]
        k_scales, v_scales = cache.write(cache_pos, k, v)
        return cpu_ops.ops().attention(q, cache.k_cache[:batch], cache.v_cache[:batch], mask, k_scales, v_scales)

    def run_path(self, path: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if path == "native":
            return cpu_ops.ops().attention(q, k, v, mask)
        if path != "reduction" or q.shape[2] != 1:
            return super().attend(q, k, v, mask)
        batch, heads, _, head_dim = q.shape
        kv_heads = k.shape[1]
        q = q.view(batch, kv_heads, heads // kv_heads, 1, head_dim).float()
        scores = (q * k[:, :, None].float()).sum(-1) * head_dim ** -0.5  # [batch, kv_heads, group, cache_len]
        scores = scores.masked_fill(~mask, -float("inf"))  # mask [.., 1, cache_len] broadcasts over the group
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [batch, kv_heads, group, head_dim]
        return out.view(batch, heads, 1, head_dim).to(k.dtype)


class DecodeFeedForward(FeedForward):
    """A feed-forward of float DecodeLinears: where w1 and w3 both take the native kernel for a number of rows
    under compile, and the measurement says it pays (choose_float_paths), one native call computes
    silu(w1 x) * (w3 x), as quantize.GatedFeedForward does for quantized layers."""

    gated_rows: frozenset = frozenset()

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if rows in self.gated_rows and torch.compiler.is_compiling():
            return self.w2(self.gated(x.reshape(-1, self.w1.in_features)).reshape(*x.shape[:-1], self.w1.out_features))
        return super().forward(x)

    def gated(self, x: Tensor) -> Tensor:
        return cpu_ops.ops().float_gated_linear(x, self.w1.weight, self.w3.weight)

    def separate(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(self.w1.run_path("native", x)) * self.w3.run_path("native", x)


ATTENTION_TIMING_CACHE = 512  # cache slots an attention path is timed with, all of them attended to


@torch.no_grad()
def choose_attention_paths(models: list, choices: cpu_ops.KernelChoices):
    """Per attention shape (heads, KV heads, head size, dtype) and number of query rows (1 to 8), the fastest
    path on this machine (cached in `choices`): the reduction timed compiled (one row), SDPA and the native
    kernel eager (in the graph they are the same external calls). Timed with every slot of a 512-slot cache
    attended to, the native kernel's worst case (it skips the slots a causal mask hides)."""
    native = cpu_ops.load()
    layers = [(m, next(p.dtype for p in model.parameters() if p.is_floating_point()), int8_cache(model))
              for model in models for m in model.modules() if type(m) is DecodeAttention]  # dtype: the float cache's
    for module, dtype, int8 in layers:
        module.paths = {}
        for rows in range(1, DecodeLinear.MAX_ROWS + 1):
            q = torch.randn(1, module.n_head, rows, module.head_dim, dtype=dtype)
            k, v = (torch.randn(1, module.n_local_heads, ATTENTION_TIMING_CACHE, module.head_dim, dtype=dtype)
                    for _ in range(2))
            mask = torch.ones(1, 1, rows, ATTENTION_TIMING_CACHE, dtype=torch.bool)
            timers = {name: (lambda name=name: cpu_ops.time_call(lambda: module.run_path(name, q, k, v, mask)))
                      for name in ["sdpa"] + (["native"] if native else [])}
            if rows == 1:
                timers["reduction"] = lambda: cpu_ops.time_compiled(
                    lambda q, k, v, mask: module.run_path("reduction", q, k, v, mask), q, k, v, mask)
            key = (f"attention {module.n_head}x{module.n_local_heads}x{module.head_dim} "
                   f"{str(dtype).removeprefix('torch.')} rows {rows} cache {ATTENTION_TIMING_CACHE}")
            module.paths[rows] = choices.choose(key, timers)
        module.int8_cache_paths = {}
        if native and int8:
            choose_int8_cache_paths(module, dtype, choices)
    choices.save()


def int8_cache(model) -> bool:
    """Whether `model` decodes through an int8 KV cache (set at load, before setup_caches allocates it)."""
    return getattr(model, "kv_cache_dtype", None) == torch.int8


def choose_int8_cache_paths(module: DecodeAttention, dtype, choices: cpu_ops.KernelChoices):
    """For an int8 KV cache, per number of rows: the native kernel on the int8 entries, or the whole cache
    dequantized into a copy and attended by the path chosen for a float cache. Both timed with the cache write,
    eager, a 512-slot cache every slot of which is attended to (the native kernel's worst case; the copy's cost
    is the same at any position)."""
    from model import KVCache

    for rows in range(1, DecodeLinear.MAX_ROWS + 1):
        cache = KVCache(1, ATTENTION_TIMING_CACHE, module.n_local_heads, module.head_dim, dtype, quantized=True)
        q = torch.randn(1, module.n_head, rows, module.head_dim, dtype=dtype)
        k, v = (torch.randn(1, module.n_local_heads, rows, module.head_dim, dtype=dtype) for _ in range(2))
        position = torch.arange(ATTENTION_TIMING_CACHE - rows, ATTENTION_TIMING_CACHE)
        mask = torch.ones(1, 1, rows, ATTENTION_TIMING_CACHE, dtype=torch.bool)
        float_path = module.paths[rows] if module.paths[rows] != "reduction" else "sdpa"  # the reduction: compiled only
        kept, module.kv_cache = module.kv_cache, cache
        try:
            timers = {"native": lambda: cpu_ops.time_call(lambda: module.native_int8_cache(q, k, v, mask, position)),
                      "dequantize": lambda: cpu_ops.time_call(
                          lambda: module.run_path(float_path, q, *cache.update(position, k, v), mask))}
            key = (f"attention int8 cache {module.n_head}x{module.n_local_heads}x{module.head_dim} "
                   f"{str(dtype).removeprefix('torch.')} rows {rows} cache {ATTENTION_TIMING_CACHE}")
            module.int8_cache_paths[rows] = choices.choose(key, timers)
        finally:
            module.kv_cache = kept


@torch.no_grad()
def choose_float_paths(models: list, choices: cpu_ops.KernelChoices):
    """Per float linear shape and number of rows (1 to DecodeLinear.MAX_ROWS), the fastest path on this machine
    (cached in `choices`): the reduction timed compiled (one row), the matmul and the native kernel timed eager
    (in the graph they are the same external calls)."""
    from tqdm import tqdm

    layers = [m for model in models for m in model.modules() if type(m) is DecodeLinear]
    native = cpu_ops.load()

    def key(module, rows):
        dtype = str(module.weight.dtype).removeprefix("torch.")
        return f"float {module.out_features}x{module.in_features} {dtype} rows {rows} compiled"

    keys = [key(m, rows) for m in layers for rows in range(1, DecodeLinear.MAX_ROWS + 1)]
    for module in tqdm(layers, desc="timing compiled paths", unit="layer", leave=False,
                       disable=all(k in choices.choices for k in keys)):
        module.paths = {}
        for rows in range(1, DecodeLinear.MAX_ROWS + 1):
            x = torch.randn(1, rows, module.in_features, dtype=module.weight.dtype)
            timers = {name: (lambda name=name: cpu_ops.time_call(lambda: module.run_path(name, x)))
                      for name in ["linear"] + (["native"] if native else [])}
            if rows == 1:
                timers["reduction"] = lambda: cpu_ops.time_compiled(lambda x: module.run_path("reduction", x), x)
            module.paths[rows] = choices.choose(key(module, rows), timers)
    for module in (m for model in models for m in model.modules() if type(m) is DecodeFeedForward):
        w1, w3, gated = module.w1, module.w3, set()
        same = (type(w1) is type(w3) is DecodeLinear and w1.weight.shape == w3.weight.shape
                and w1.weight.dtype == w3.weight.dtype and w1.bias is None and w3.bias is None)
        for rows in range(1, DecodeLinear.MAX_ROWS + 1) if native and same else ():
            if w1.paths.get(rows) == w3.paths.get(rows) == "native":
                x = torch.randn(rows, w1.in_features, dtype=w1.weight.dtype)
                timers = {name: (lambda name=name: cpu_ops.time_call(lambda: getattr(module, name)(x)))
                          for name in ("gated", "separate")}
                if choices.choose(f"{key(w1, rows)} gated", timers) == "gated":
                    gated.add(rows)
        module.gated_rows = frozenset(gated)
    choices.save()


def float_paths_summary(models: list) -> list:
    """One line per distinct float linear shape under compile: its one-token path on this machine."""
    lines = {}
    for module in (m for model in models for m in model.modules() if type(m) is DecodeLinear):
        key = f"float {module.out_features}x{module.in_features}"
        buckets = list(range(1, DecodeLinear.MAX_ROWS + 2))  # the last: every longer input
        paths = {**module.paths, buckets[-1]: "linear"}
        lines.setdefault(key, f"{key}: {cpu_ops.describe_paths(paths, buckets)}")
    for module in (m for model in models for m in model.modules() if type(m) is DecodeFeedForward and m.gated_rows):
        key = f"float {module.w1.out_features}x{module.w1.in_features} gate and up"
        buckets = list(range(1, DecodeLinear.MAX_ROWS + 2))
        rows = {r: "one call" if r in module.gated_rows else "two calls" for r in buckets}
        lines.setdefault(key, f"{key}: {cpu_ops.describe_paths(rows, buckets)}")
    for module in (m for model in models for m in model.modules() if type(m) is DecodeAttention):
        key = f"attention {module.n_head}x{module.n_local_heads}x{module.head_dim}"
        buckets = list(range(1, DecodeLinear.MAX_ROWS + 2))
        lines.setdefault(key, f"{key}: {cpu_ops.describe_paths({**module.paths, buckets[-1]: 'sdpa'}, buckets)}")
        if module.int8_cache_paths:
            paths = {**module.int8_cache_paths, buckets[-1]: "dequantize"}
            lines.setdefault(key + " int8 cache", f"{key} int8 cache: {cpu_ops.describe_paths(paths, buckets)}")
    return list(lines.values())


class DecodeBlock(TransformerBlock):
    """A transformer block whose decoded token, or verified drafts (1-8 rows of a batch of one, under compile on
    CPU), may take one native call, cpu_ops.cpp's decoder_block (norm, qkv, q/k norms, rope, the cache write,
    attention, wo, residual, norm, gate and up, down, residual), where the module path makes ~8 calls, each a
    dispatcher trip and an OpenMP fork and join. Taken for the numbers of rows where
    choose_block_paths measured it faster (`native_rows`); anything else (eager, prompts, batches, layers it
    cannot take: hooks, activation rounding) is the module path. An int8 KV cache is read as it is (its
    entries and scales), as DecodeAttention's native path reads it."""

    native_rows: frozenset = frozenset()
    native_region = native_layout = native_kinds = None  # pack_native_weights: where the one call finds its weights

    def forward(self, x, rope, mask, cache_pos):
        rows = x.shape[1]
        if (rows in self.native_rows and x.shape[0] == 1 and torch.compiler.is_compiling()
                and mask.shape[2] in (1, rows) and not self.compiled_as_region() and self.native_layout is not None):
            return self.native_forward(x, rope, mask, cache_pos)
        return super().forward(x, rope, mask, cache_pos)

    def compiled_as_region(self) -> bool:
        """A RegionBlock compiled as a region of its own (not inlined into the whole step) keeps the module path:
        the native call writes the KV cache in place, and a region's functionalization (C++, in torch 2.13)
        refuses a custom operator that mutates its inputs."""
        return isinstance(self, RegionBlock) and not getattr(torch._dynamo.config, "inline_invoke_subgraph", False)

    def linears(self) -> list:
        attention, ffn = self.attention, self.feed_forward
        return [attention.wqkv, attention.wo, ffn.w1, ffn.w3, ffn.w2]

    def can_take_native(self) -> bool:
        """Every product has a native layout, no module hooks (tensor parallel's all-reduces), w1 and w3 alike."""
        linears = self.linears()
        if not cpu_ops.load() or any(m._forward_hooks or m._forward_pre_hooks for m in self.modules() if m is not self):
            return False
        weights = [getattr(m, "native_weights", lambda: None)() for m in linears]
        return (all(w is not None for w in weights) and weights[2][3:] == weights[3][3:]
                and all(m.bias is None for m in linears[1:]))

    def native_pieces(self) -> list:
        """What the one call reads, in cpu_ops.cpp's PIECES order (None: absent): the norms, qkv's bias, q and k
        norms (Qwen3), then each product's layout (a, b, c of native_weights)."""
        attention = self.attention
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        pieces = [self.attention_norm.weight, self.ffn_norm.weight, attention.wqkv.bias,
                  q_norm.weight if q_norm else None, k_norm.weight if k_norm else None]
        for linear in self.linears():
            pieces += linear.native_weights()[:3]
        return pieces

    def pack_native_weights(self, region=None):
        """Give the one call its weights as one region and the pieces' places in it (native_region,
        native_layout): the compiled step then passes one tensor for all of them, not ~17 a block (each one
        fetched by dynamo's bytecode and converted by the wrapper on every token: ~0.7 us a tensor, ~0.35 ms of
        a 4 ms int4 SmolLM2 token). `region`: the model's weights placed together at load
        (memory.place_in_huge_pages), if every piece lies in it; else the region of an earlier call; else the
        block's weights are moved into a region of their own. The modules keep their tensors (now in the
        region): the module path is unchanged. A piece that cannot lie in one (not contiguous) leaves the block
        unpacked, on the module path."""
        pieces = self.native_pieces()
        holds = lambda candidate: candidate is not None and all(memory.inside(t, candidate) for t in pieces if t is not None)
        region = next((candidate for candidate in (region, self.native_region) if holds(candidate)), None)
        if region is None:
            region, _ = memory.place_together(self)
            pieces = self.native_pieces()
            if not holds(region):
                self.native_region = self.native_layout = self.native_kinds = None
                return
        base = region.data_ptr()
        layout = [[t.data_ptr() - base, PIECE_CODES[t.dtype], t.numel()] if t is not None else [-1, 0, 0]
                  for t in pieces]
        self.native_region, self.native_layout = region, torch.tensor(layout, dtype=torch.long)
        linears = self.linears()
        self.native_kinds = [value for i in (0, 1, 2, 4) for value in linears[i].native_weights()[3:5]]

    def native_forward(self, x, rope, mask, cache_pos):
        if not torch.compiler.is_compiling():  # eager (tests): packed as the modules are now
            self.pack_native_weights()
        attention, ffn, ops = self.attention, self.feed_forward, cpu_ops.ops()
        rows = x.shape[1]
        q_norm = getattr(attention, "q_norm", None)
        cache = attention.kv_cache  # written in place: k and v, and an int8 cache's scales
        scales = (cache.k_scales, cache.v_scales) if getattr(cache, "quantized", False) else ()
        wqkv, w1 = attention.wqkv, ffn.w1
        out = ops.decoder_block(
            x.reshape(rows, -1), self.native_region, self.native_layout, self.native_kinds, self.attention_norm.eps,
            self.ffn_norm.eps, q_norm.eps if q_norm else 0.0, attention.n_head, attention.n_local_heads,
            wqkv.out_features, w1.out_features, rope[0], rope[1], cache.k_cache, cache.v_cache, cache_pos, mask,
            *scales)
        return out.view_as(x)


PIECE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.uint8: 4}  # cpu_ops.cpp's


class RegionBlock(DecodeBlock):
    """A DecodeBlock that torch.compile traces and compiles once and then calls for every layer (PyTorch's
    regional compilation): the C++ compiler sees one block's kernels instead of n_layer copies of them."""

    forward = torch.compiler.nested_compile_region(DecodeBlock.forward)


BLOCK_TIMING_CACHE = 64  # cache slots of the timed block (16-23 attended): the fixed costs are what differ
BLOCK_TIMED_ROWS = (1, 4)  # one decoded token; a verification (4 stands for 2-8: each would be two compiles)


def block_key(block: DecodeBlock, dtype, rows: int, int8: bool = False) -> str:
    def kind(module):
        a, _, _, kind, groupsize = module.native_weights()
        name = {0: str(a.dtype).removeprefix("torch."), 1: f"int8 g{groupsize}", 2: f"int4 g{groupsize}"}[kind]
        return f"{name} {module.out_features}x{module.in_features}"
    attention = block.attention
    return (f"block {', '.join(kind(m) for m in block.linears())} heads {attention.n_head}x"
            f"{attention.n_local_heads}x{attention.head_dim}{' int8 cache' if int8 else ''} {str(dtype).removeprefix('torch.')} "
            f"rows {rows} compiled")


@torch.no_grad()
def choose_block_paths(models: list, choices: cpu_ops.KernelChoices):
    """Per block kind (its layers' kinds and shapes, heads, dtype), the numbers of rows that take the native
    call: a one-block step of 1 row and of 4 (standing for 2-8) timed compiled both ways, in turns (each product
    on its own measured path in the other), with a cache of its own. Call after the other paths are chosen."""
    for model in models:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for block in (m for m in model.modules() if isinstance(m, DecodeBlock)):
            block.native_rows = frozenset()
            if not block.can_take_native():
                continue
            block.pack_native_weights(getattr(model, "weight_region", None))  # again: the paths chosen may differ
            native_rows = set()
            for rows in BLOCK_TIMED_ROWS:
                key = block_key(block, dtype, rows, int8_cache(model))
                if key not in choices.choices:
                    times = time_block(block, dtype, rows, int8_cache(model))
                    choices.choose(key, {name: (lambda us=us: us) for name, us in times.items()})
                if choices.choices[key]["path"] == "one call":
                    native_rows |= {1} if rows == 1 else set(range(2, DecodeLinear.MAX_ROWS + 1))
            block.native_rows = frozenset(native_rows)
    choices.save()


def time_block(block: DecodeBlock, dtype, rows: int, int8: bool = False) -> dict:
    """{"module path": us, "one call": us}: `block` compiled alone both ways for `rows` rows at positions 16
    on, its cache swapped for a small one of its own (int8 with `int8`) while timed."""
    from model import KVCache

    attention = block.attention
    kept_cache, kept_rows = attention.kv_cache, block.native_rows
    attention.kv_cache = KVCache(1, BLOCK_TIMING_CACHE, attention.n_local_heads, attention.head_dim, dtype,
                                 quantized=int8)
    x = torch.randn(1, rows, block.attention_norm.weight.shape[0], dtype=dtype)
    rope = tuple(torch.randn(rows, attention.head_dim, dtype=dtype) for _ in range(2))
    position = torch.arange(16, 16 + rows)
    mask = torch.ones(BLOCK_TIMING_CACHE, BLOCK_TIMING_CACHE, dtype=torch.bool).tril()[None, None, position]

    def run(native, x, cos, sin, mask, position):
        block.native_rows = frozenset({rows}) if native else frozenset()
        return DecodeBlock.forward(block, x, (cos, sin), mask, position)

    try:  # as the whole step compiles it (compiled_step.py swaps in RegionBlocks and inlines them: the one call)
        with torch._dynamo.config.patch(inline_invoke_subgraph=True):
            return cpu_ops.time_compiled_alternately(
                {"module path": lambda *inputs: run(False, *inputs), "one call": lambda *inputs: run(True, *inputs)},
                x, *rope, mask, position)
    finally:
        attention.kv_cache, block.native_rows = kept_cache, kept_rows


def block_paths_summary(models: list) -> list:
    """One line per block kind that can take the one native call: the numbers of rows that take it."""
    lines = {}
    for model in models:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for block in (m for m in model.modules() if isinstance(m, DecodeBlock) and m.can_take_native()):
            key = block_key(block, dtype, 1, int8_cache(model)).removesuffix(" rows 1 compiled")
            buckets = list(range(1, DecodeLinear.MAX_ROWS + 2))  # the last: every longer input
            paths = {r: "one native call" if r in block.native_rows else "module path" for r in buckets}
            lines.setdefault(key, f"{key}: {cpu_ops.describe_paths(paths, buckets)}")
    return list(lines.values())


COMPILE_MODES = ("regional", "whole")


def use_decode_kernels(models: list, device, choose: bool = True, mode: str = "whole"):
    """Set up `models` (target, draft, Medusa heads) and inductor for a compiled decode on `device`; with
    `choose`, each float linear's one-token path is the faster of two on this machine (choose_float_paths).

    mode "regional": every transformer block is one compiled region shared by all layers, launched by
    inductor's Python wrapper (its C++ wrapper cannot call a region yet): 5-8x shorter to compile, but Python
    launches every kernel (6-26% fewer tokens/s on a 2-core Zen 1). "whole": one C++ graph for the whole step
    (cpp_wrapper, no Python between kernels). bench.py compares them (--regional adds the rows)."""
    if torch.device(device).type != "cpu":
        return  # CUDA: inductor's own matmuls and CUDA graphs (mode="reduce-overhead", in generate.py)
    import torch._inductor.config as inductor_config

    swap_decode_modules(models, mode)
    # Freezing stays off: it would fold the weights' float() into float32 copies and double the bytes read.
    inductor_config.cpp_wrapper = mode == "whole"
    # The wrapper's per-call size and stride checks of every input (hundreds a token, about 7% of an int4
    # SmolLM2 step, measured) repeat what dynamo's guards check before the call.
    inductor_config.size_asserts = False
    if choose:
        choices = cpu_ops.KernelChoices()
        choose_float_paths(models, choices)
        choose_attention_paths(models, choices)


def swap_decode_modules(models: list, mode: str):
    """Plain Linear -> DecodeLinear, Attention -> DecodeAttention, FeedForward -> DecodeFeedForward, and the blocks to RegionBlock ("regional")
    or DecodeBlock ("whole"). Eager computation is unchanged."""
    for module in (m for model in models for m in model.modules()):
        if type(module) is torch.nn.Linear:  # plain float linears only; quantized modules keep their paths
            module.__class__ = DecodeLinear
        elif type(module) is Attention:
            module.__class__ = DecodeAttention
        elif type(module) is FeedForward:
            module.__class__ = DecodeFeedForward
        elif type(module) in (TransformerBlock, RegionBlock, DecodeBlock):
            module.__class__ = RegionBlock if mode == "regional" else DecodeBlock
    for model in models:  # where a compiled step (built here or loaded: compiled_step.py) finds a block's weights
        for block in (m for m in model.modules() if isinstance(m, DecodeBlock)):
            if block.attention_norm.weight.device.type == "cpu" and block.can_take_native():
                block.pack_native_weights(getattr(model, "weight_region", None))
