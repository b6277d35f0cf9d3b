"""The CPU kernel paths of quantized layers and the measured choice between them.

Every path a layer offers on this machine is compared with the dequantized reference (paths this machine
cannot run are skipped, with the reason); the native kernels are also compared, tightly, with their exact
arithmetic in PyTorch (activations quantized per block of 32). The choice cache is re-measured when corrupt or
from another CPU, and a native build that fails leaves the PyTorch paths with one warning."""
import json
import warnings

import pytest
import torch

import cpu_ops
import decode_kernels
import quantize
from quantize import Int4Linear, Int8Linear, dequantize_int4, dequantize_int8

native = pytest.mark.skipif(not cpu_ops.load(), reason="native CPU kernels could not be built on this machine")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


LAYERS = {  # name: (module from a float linear, float32 dequantized weight)
    "int8 per channel": lambda lin: Int8Linear.from_linear(lin),
    "int8 g32": lambda lin: Int8Linear.from_linear(lin, 32),
    "int8 g64": lambda lin: Int8Linear.from_linear(lin, 64),
    "int4 g32": lambda lin: Int4Linear.from_linear(lin, 32),
    "int4 g128": lambda lin: Int4Linear.from_linear(lin, 128),
}


def dequantized(module):
    if isinstance(module, Int8Linear):
        return dequantize_int8(module.weight, module.scales)
    return dequantize_int4(quantize.unpack_int4(module.weight), module.scales, module.zeros, module.groupsize)


def forced(module, dtype, name, tmp_path):
    """Prepare `module` with a choice file that names path `name` for every number of rows."""
    choices = cpu_ops.KernelChoices(tmp_path / "forced.json")
    key = quantize.path_key(module, dtype)
    choices.choices.update({f"{key} rows {rows}": {"path": name, "us": {}} for rows in quantize.ROW_BUCKETS})
    module.prepare_for_device(dtype, choices)
    return module


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("path", ["dequant", "aten", "native"])
def test_every_path_matches_the_dequantized_reference(layer, path, tmp_path):
    if path == "native" and not cpu_ops.load():
        pytest.skip("native CPU kernels could not be built on this machine")
    if path != "native" and (path == "dequant") != layer.startswith("int8 g"):
        pytest.skip(f"{layer} has no {path} path")  # grouped int8: no ATen kernel; ATen's own for the rest
    torch.manual_seed(0)
    module = LAYERS[layer](torch.nn.Linear(256, 80, bias=False))
    weight = dequantized(module)
    module = forced(module.to(torch.bfloat16), torch.bfloat16, path, tmp_path)
    for rows in (1, 3, 5, 8):
        assert path in module.path_names(rows)
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        reference = x.float() @ weight.T
        assert relative_error(module(x), reference) < 0.02, rows
    if isinstance(module, Int8Linear):  # the compiled one-token reduction
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = torch.compile(lambda x: module.run_path("reduction", x), fullgraph=True)
            assert relative_error(compiled(x[:1]), reference[:1]) < 0.01


@native
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 64])
def test_native_kernels_compute_llama_cpp_arithmetic(layer, rows, tmp_path):
    """Activations rounded to int8 per block of 32, integer dot products, float scales: the same as PyTorch does it
    in float64, to float32 rounding; and within activation rounding of the float product."""
    torch.manual_seed(rows)
    module = LAYERS[layer](torch.nn.Linear(256, 48, bias=False))
    weight = dequantized(module).double()
    if isinstance(module, Int4Linear):  # the kernel's d and m are float16
        d, m = module.scales.half().double(), (module.zeros - 8 * module.scales).half().double()
        q = quantize.unpack_int4(module.weight).double().reshape(48, -1, module.groupsize)
        weight = (q * d[..., None] + m[..., None]).reshape(48, 256)
    module = forced(module, torch.float32, "native", tmp_path)
    x = torch.randn(rows, 256)
    q, scale = cpu_ops.quantized_activations(x)
    exact = (q * scale).reshape(rows, 256).double() @ weight.T
    ours = module.run_path("native", x)
    assert ours.dtype == torch.float32 and ours.shape == (rows, 48)
    assert torch.allclose(ours.double(), exact, rtol=1e-5, atol=1e-4 * exact.abs().max().item())
    assert relative_error(ours, x @ weight.T.float()) < 0.02
    with torch._dynamo.config.patch(recompile_limit=64):  # one compile per parameter set, of the same lambda
        compiled = torch.compile(lambda x: module.run_path("native", x), fullgraph=True)  # an opaque op in a graph
        assert torch.equal(compiled(x), ours)
    rounded = x.bfloat16()  # 16-bit activations: the same arithmetic on their values, the result rounded once
    assert torch.equal(module.run_path("native", rounded), module.run_path("native", rounded.float()).bfloat16())


@native
@pytest.mark.parametrize("layer", ["int8 per channel", "int8 g64", "int4 g32", "int4 g128"])
def test_native_kernels_pad_the_last_tile(layer, tmp_path):
    """40 channels are 2.5 tiles of 16: the padding channels are computed and dropped, the others unchanged."""
    torch.manual_seed(0)
    module = LAYERS[layer](torch.nn.Linear(256, 48, bias=False))
    x = torch.randn(3, 256)
    if isinstance(module, Int8Linear):
        tiles = cpu_ops.int8_tiles(module.weight[:40], module.scales[:40])
        ours = cpu_ops.ops().int8_linear(x, *tiles, module.groupsize or 256, 40)
    else:
        tiles = cpu_ops.int4_tiles(quantize.unpack_int4(module.weight)[:40], module.scales[:40], module.zeros[:40])
        ours = cpu_ops.ops().int4_linear(x, *tiles, module.groupsize, 40)
    module = forced(module, torch.float32, "native", tmp_path)
    assert ours.shape == (3, 40) and torch.equal(ours, module.run_path("native", x)[:, :40])


def layer_as_tiles(module, dtype):
    """(weight_rows(n0, n1), the weights the tiles hold in float32) of a quantized layer: int4's d and m are
    float16 in the tiles (cpu_ops.int4_tiles)."""
    K, N = module.in_features, module.out_features
    if isinstance(module, Int8Linear):
        tiles, scales = cpu_ops.int8_tiles(module.weight, module.scales)
        return (lambda n0, n1: cpu_ops.ops().int8_weight_rows(tiles, scales, module.groupsize or K, K, N, n0, n1, dtype),
                dequantize_int8(module.weight, module.scales))
    q = quantize.unpack_int4(module.weight)
    tiles, d, m = cpu_ops.int4_tiles(q, module.scales, module.zeros)
    held = (q.float() * module.scales.half().float().repeat_interleave(module.groupsize, 1)
            + (module.zeros - 8 * module.scales).half().float().repeat_interleave(module.groupsize, 1))
    return (lambda n0, n1: cpu_ops.ops().int4_weight_rows(tiles, d, m, module.groupsize, K, N, n0, n1, dtype), held)


@native
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_rows_widen_the_tiles_to_the_layers_weights(layer, dtype):
    """What a prompt's "tiles" path multiplies by: channel ranges of the native tiles (the last tile padded)
    widened to the weights they hold, rounded once to the activations' dtype."""
    torch.manual_seed(0)
    module = LAYERS[layer](torch.nn.Linear(256, 88, bias=False))  # 88 channels: five whole tiles and half of one
    weight_rows, held = layer_as_tiles(module, dtype)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for n0, n1 in ((0, 88), (16, 88), (32, 48), (80, 88), (0, 1)):
        rows = weight_rows(n0, n1)
        assert rows.dtype == dtype and rows.shape == (n1 - n0, 256)
        torch.testing.assert_close(rows.float(), held[n0:n1], rtol=tolerance, atol=1e-7)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        weight_rows(8, 24)


@native
@pytest.mark.parametrize("layer", LAYERS)
def test_a_prompt_through_the_tiles_keeps_one_layout(layer, tmp_path, monkeypatch):
    """Decoded rows natively and prompts through the tiles widened chunk by chunk: the layer then holds the tiles
    alone (no ATen layout, no plain weights), and a prompt's product is the float product on the tiles' weights."""
    torch.manual_seed(0)
    module = LAYERS[layer](torch.nn.Linear(256, 96, bias=False))
    weight_rows, held = layer_as_tiles(module, torch.float32)
    choices = cpu_ops.KernelChoices(tmp_path / "forced.json")
    key = quantize.path_key(module, torch.float32)
    choices.choices.update({f"{key} rows {rows}": {"path": "native" if rows <= 8 else "tiles", "us": {}}
                            for rows in quantize.ROW_BUCKETS})
    module.prepare_for_device(torch.float32, choices)
    assert set(module._buffers) - {"kernel_scales", "scales", "zeros"} == \
        ({"tiles", "tile_scales"} if isinstance(module, Int8Linear) else {"tiles", "tile_d", "tile_m"})
    monkeypatch.setattr(quantize, "TILES_CHUNK_BYTES", 1)  # chunks of one tile: the chunked loop and the last part
    x = torch.randn(21, 256)
    torch.testing.assert_close(module(x), x @ held.T, rtol=1e-5, atol=1e-5)
    assert relative_error(module(x[:3]), x[:3] @ held.T) < 0.02  # decoded rows: the native kernel


@native
@pytest.mark.parametrize("layer", ["int8 per channel", "int4 g32"])
def test_bytes_read_per_token_count_the_decode_layout_only(layer, tmp_path):
    """A layer holding its weights twice (the prompt layout and the native tiles) reads one copy per token."""
    import memory

    model = torch.nn.Module()
    model.tok_embeddings = torch.nn.Embedding(8, 256)  # not tied: one row read per token, not counted
    module = LAYERS[layer](torch.nn.Linear(256, 48, bias=False))
    choices = cpu_ops.KernelChoices(tmp_path / "forced.json")  # decoded rows natively, prompts by a plain layout
    plain = "dequant" if layer.startswith("int8 g") else "aten"
    key = quantize.path_key(module, torch.float32)
    choices.choices.update({f"{key} rows {rows}": {"path": "native" if rows <= 8 else plain, "us": {}}
                            for rows in quantize.ROW_BUCKETS})
    module.prepare_for_device(torch.float32, choices)
    model.output = module
    names = ["tiles", "tile_scales"] if layer.startswith("int8") else ["tiles", "tile_d", "tile_m"]
    tiles = memory.tensor_bytes(getattr(model.output, name) for name in names)
    held = memory.tensor_bytes(model.output.buffers())
    assert tiles == 48 * (256 if layer.startswith("int8") else 128) + memory.tensor_bytes(getattr(model.output, n) for n in names[1:])
    assert memory.weight_bytes(model) == tiles < held  # the prompt layout is held too, but not read per token


@native
def test_a_weight_of_minus_128_keeps_the_layer_off_the_native_path():
    module = Int8Linear.from_linear(torch.nn.Linear(64, 16))
    module.weight[0, 0] = -128  # a GGUF may hold one; the kernel's sign trick cannot
    module.prepare_for_device(torch.float32)
    assert module.path_names(1) == ["aten"]


def test_choices_are_measured_once_and_cached(tmp_path):
    path = tmp_path / "choices.json"
    calls = []

    def timer(name, us):
        return lambda: calls.append(name) or us

    choices = cpu_ops.KernelChoices(path)
    assert choices.choose("k", {"slow": timer("slow", 9.0), "fast": timer("fast", 2.0)}) == "fast"
    assert choices.choose("k", {"slow": timer("slow", 9.0), "fast": timer("fast", 2.0)}) == "fast"
    assert sorted(calls) == ["fast", "slow"]
    choices.save()
    again = cpu_ops.KernelChoices(path)
    assert again.choose("k", {"slow": timer("slow", 1.0), "fast": timer("fast", 2.0)}) == "fast"  # from the file
    assert len(calls) == 2 and again.time_of("k", "slow") == 9.0


def test_a_failing_candidate_is_not_chosen(tmp_path, capsys):
    def broken():
        raise RuntimeError("no such instruction")

    assert cpu_ops.KernelChoices(tmp_path / "c.json").choose("k", {"a": broken, "b": lambda: 5.0}) == "b"
    assert "kernel path a failed for k: no such instruction" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["corrupt", "other cpu", "other torch"])
def test_a_corrupt_or_foreign_cache_is_measured_again(tmp_path, capsys, damage):
    path = tmp_path / "choices.json"
    choices = cpu_ops.KernelChoices(path)
    choices.choose("k", {"a": lambda: 1.0, "b": lambda: 2.0})
    choices.save()
    data = json.loads(path.read_text())
    if damage == "corrupt":
        path.write_text(path.read_text()[:40])
    else:
        data["flags" if damage == "other cpu" else "torch"] = "something else"
        path.write_text(json.dumps(data))
    again = cpu_ops.KernelChoices(path)
    assert again.choose("k", {"a": lambda: 3.0, "b": lambda: 2.0}) == "b"  # measured anew
    err = capsys.readouterr().err
    assert ("unreadable" if damage == "corrupt" else "another CPU or torch") in err and "measuring again" in err
    again.save()
    assert json.loads(path.read_text())["choices"]["k"]["path"] == "b"


def test_a_failed_native_build_falls_back_with_one_warning(monkeypatch):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'gptfast_cpu': g++: command not found")

    monkeypatch.setattr(cpu_ops, "_loaded", None)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: "/nonexistent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_ops.load() is False
        assert cpu_ops.load() is False  # tried once per process
    assert [str(w.message) for w in caught] == [
        "native CPU kernels unavailable, using PyTorch's (Error building extension 'gptfast_cpu': g++: command not found)"]
    module = Int4Linear.from_linear(torch.nn.Linear(64, 16), 32)
    module.prepare_for_device(torch.float32, cpu_ops.KernelChoices())
    assert module.path_names(1) == ["aten"] and set(module.paths.values()) == {"aten"}


def test_built_native_kernels_load_without_the_compiler():
    """A library built before (by this or another virtual environment of the same torch) is loaded as it is:
    through cpp_extension.load, another environment's include paths would make ninja compile it again."""
    import subprocess
    import sys

    if not cpu_ops.load():
        pytest.skip("the native kernels do not build on this machine")
    script = f"""
import sys
from torch.utils import cpp_extension
def no_compiler(**kwargs):
    raise RuntimeError("the compiler was called")
cpp_extension.load = no_compiler
sys.path.insert(0, {str(cpu_ops.SOURCE.parent)!r})
import cpu_ops
assert cpu_ops.load()
print(callable(cpu_ops.ops().int4_linear))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_layers_take_their_measured_paths(tmp_path, monkeypatch):
    """The cached choice decides the path per number of rows, and the layouts no chosen path needs are freed."""
    path = tmp_path / "choices.json"
    module = Int4Linear.from_linear(torch.nn.Linear(64, 16), 32)
    key = quantize.path_key(module, torch.float32)
    wanted = {rows: ("native" if rows == 1 and cpu_ops.load() else "aten") for rows in quantize.ROW_BUCKETS}
    choices = cpu_ops.KernelChoices(path)
    for rows, name in wanted.items():
        choices.choices[f"{key} rows {rows}"] = {"path": name, "us": {}}
    module.prepare_for_device(torch.float32, choices)
    assert module.paths == wanted
    taken = []
    monkeypatch.setattr(module, "run_path", lambda name, x: taken.append(name) or torch.zeros(x.shape[0], 16))
    module(torch.zeros(1, 1, 64)), module(torch.zeros(1, 5, 64)), module(torch.zeros(1, 100, 64))
    assert taken == [wanted[1], wanted[5], wanted[64]]
    assert hasattr(module, "packed") and hasattr(module, "tiles") == cpu_ops.load()


def test_float_linears_take_their_measured_paths(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    model = torch.nn.Sequential(linear)
    choices = cpu_ops.KernelChoices(tmp_path / "choices.json")
    wanted = {rows: ["native", "linear"][rows % 2] if cpu_ops.load() else "linear" for rows in range(1, 9)}
    choices.choices.update({f"float 32x64 float32 rows {rows} compiled": {"path": name, "us": {}}
                            for rows, name in wanted.items()})
    linear.__class__ = decode_kernels.DecodeLinear
    decode_kernels.choose_float_paths([model], choices)
    assert linear.paths == wanted
    for path in ["reduction", "linear"] + (["native"] if cpu_ops.load() else []):
        for rows in (1, 3, 4, 5, 8):
            x = torch.randn(2, rows, 64)
            assert torch.allclose(linear.run_path(path, x), x @ linear.weight.T + linear.bias, atol=1e-5), (path, rows)
    if cpu_ops.load():  # an input width that leaves a remainder after the vector loops (16 or 32 at a time)
        odd = decode_kernels.DecodeLinear(72, 24)
        for rows in (1, 2, 3):
            x = torch.randn(rows, 72)
            assert torch.allclose(odd.run_path("native", x), x @ odd.weight.T + odd.bias, atol=1e-5), rows
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    if cpu_ops.load():  # 16-bit weights widened in registers, float32 sums, rounded once
        weight = linear.weight.bfloat16()
        linear16 = decode_kernels.DecodeLinear(64, 32, dtype=torch.bfloat16)
        linear16.weight.data, linear16.bias.data = weight, linear.bias.bfloat16()
        reference = (x.float() @ weight.float().T + linear16.bias.float()).bfloat16()
        assert (linear16.run_path("native", x).float() - reference.float()).abs().max() <= 0.02


@native
@pytest.mark.parametrize("layer", LAYERS)
def test_gated_feed_forward_is_one_call_with_the_two_layers_arithmetic(layer, tmp_path):
    """Where w1 and w3 both take the native kernel and the one call is measured faster, it computes
    silu(w1 x) * (w3 x) as the two calls do (int8: a hidden size that pads the last tile of 16 channels)."""
    from model import FeedForward, ModelArgs

    torch.manual_seed(0)
    hidden = 40 if layer.startswith("int8") else 48  # ATen's int4 packing (the prompts' path) wants 16 | N
    feed_forward = FeedForward(ModelArgs(dim=256, intermediate_size=hidden, n_layer=1, n_head=1, vocab_size=8))
    for name in ("w1", "w3"):  # (w2 stays float: its input width is no whole number of groups)
        setattr(feed_forward, name, forced(LAYERS[layer](getattr(feed_forward, name)), torch.float32, "native", tmp_path))
    choices = cpu_ops.KernelChoices(tmp_path / "gated.json")
    key = quantize.path_key(feed_forward.w1, torch.float32)
    choices.choices.update({f"{key} gated rows {rows}": {"path": "separate" if rows == 2 else "gated", "us": {}}
                            for rows in quantize.ROW_BUCKETS[:-1]})
    quantize.choose_gated_paths(feed_forward, torch.float32, choices)
    assert type(feed_forward) is quantize.GatedFeedForward
    assert feed_forward.gated_rows == {1, 3, 4, 5, 6, 7, 8}
    assert quantize.kernel_paths_summary([feed_forward])[-1].endswith(
        "gate and up: one call (1 row), two calls (2 rows), one call (3-8 rows), two calls (longer inputs)")
    for rows in (1, 3, 8):
        x = torch.randn(rows, 256)
        separate = feed_forward.w2(feed_forward.separate(x))
        assert relative_error(feed_forward(x[None])[0], separate) < 1e-5, rows
        assert relative_error(feed_forward.gated(x), feed_forward.separate(x)) < 1e-5, rows
    x = torch.randn(1, 4, 256, dtype=torch.bfloat16)  # 16-bit activations: rounded once, at the end
    assert relative_error(feed_forward.gated(x[0]), feed_forward.separate(x[0].float())) < 1e-2


@native
def test_float_gate_and_up_in_one_call(tmp_path):
    """A float feed-forward under compile: where w1 and w3 both take the native kernel and the one call is
    measured faster, it computes silu(w1 x) * (w3 x) as the two calls do."""
    from model import FeedForward, ModelArgs

    torch.manual_seed(0)
    model = torch.nn.Sequential(FeedForward(ModelArgs(dim=64, intermediate_size=40, n_layer=1, n_head=1, vocab_size=8)))
    decode_kernels.swap_decode_modules([model], "whole")
    feed_forward = model[0]
    choices = cpu_ops.KernelChoices(tmp_path / "choices.json")
    for shape in ("40x64", "64x40"):
        choices.choices.update({f"float {shape} float32 rows {rows} compiled": {"path": "native", "us": {}}
                                for rows in range(1, 9)})
    choices.choices.update({f"float 40x64 float32 rows {rows} compiled gated": {"path": "gated" if rows != 2 else
                            "separate", "us": {}} for rows in range(1, 9)})
    decode_kernels.choose_float_paths([model], choices)
    assert type(feed_forward) is decode_kernels.DecodeFeedForward and feed_forward.gated_rows == {1, 3, 4, 5, 6, 7, 8}
    assert "float 40x64 gate and up: one call (1 row), two calls (2 rows), one call (3-8 rows), two calls (longer inputs)" \
        in decode_kernels.float_paths_summary([model])
    for rows in (1, 3, 8):
        x = torch.randn(rows, 64)
        reference = torch.nn.functional.silu(x @ feed_forward.w1.weight.T) * (x @ feed_forward.w3.weight.T)
        assert torch.allclose(feed_forward.gated(x), reference, atol=1e-5), rows
        compiled = torch.compile(feed_forward, fullgraph=True)(x[None])[0]
        assert torch.allclose(compiled, feed_forward.w2(reference), atol=1e-5), rows
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w1, w3 = feed_forward.w1.weight.bfloat16(), feed_forward.w3.weight.bfloat16()
    reference = torch.nn.functional.silu(x.float() @ w1.float().T) * (x.float() @ w3.float().T)
    assert relative_error(cpu_ops.ops().float_gated_linear(x, w1, w3), reference) < 1e-2


ATTENTION_SHAPES = [  # (batch, heads, kv heads, query rows, head size, cache slots, mask batch)
    (1, 9, 3, 1, 64, 512, 1),  # SmolLM2's decode
    (1, 4, 4, 8, 128, 70, 1),  # a verification of 7 drafts, no grouping
    (2, 8, 2, 3, 80, 100, 2),  # a head size the vector loops leave a remainder of, a mask per sequence
    (1, 2, 1, 2, 32, 9, 1),
]


def attention_mask(batch, rows, slots):
    """A causal prefix for the first row, a window for the next, random holes (a Medusa tree's) for the rest."""
    mask = torch.rand(batch, 1, rows, slots) > 0.4
    mask[:, :, 0] = False
    mask[:, :, 0, : slots // 3 + 1] = True
    if rows > 1:
        mask[:, :, 1] = False
        mask[:, :, 1, slots // 4: slots // 2 + 1] = True
    return mask


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_native_attention_matches_sdpa(shape, dtype):
    batch, heads, kv_heads, rows, head_dim, slots, mask_batch = shape
    torch.manual_seed(0)
    q = torch.randn(batch, heads, rows, head_dim).to(dtype)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim).to(dtype) for _ in range(2))
    mask = attention_mask(mask_batch, rows, slots)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                                 enable_gqa=True)
    out = cpu_ops.ops().attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # one rounding of the output to 16 bits
    assert (out.float() - reference).abs().max() <= tolerance
    # strided query rows (as the model's transpose gives them) and a mask broadcast over rows
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(cpu_ops.ops().attention(strided, k, v, mask[:, :, :1]),
                       cpu_ops.ops().attention(q, k, v, mask[:, :, :1].expand(-1, -1, rows, -1).contiguous()))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_native_attention_reads_an_int8_cache(shape, dtype):
    """k and v as model.KVCache's int8 entries with a float32 scale per token and head, read as they are: the
    attention of the dequantized cache."""
    from model import quantize_kv

    batch, heads, kv_heads, rows, head_dim, slots, mask_batch = shape
    torch.manual_seed(0)
    q = torch.randn(batch, heads, rows, head_dim).to(dtype)
    (k, k_scales), (v, v_scales) = (quantize_kv(torch.randn(batch, kv_heads, slots, head_dim) * 3) for _ in range(2))
    mask = attention_mask(mask_batch, rows, slots)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k * k_scales, v * v_scales, attn_mask=mask,
                                                                 enable_gqa=True)
    out = cpu_ops.ops().attention(q, k, v, mask, k_scales, v_scales)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - reference).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * reference.abs().max()
    with pytest.raises(RuntimeError, match="int8"):
        cpu_ops.ops().attention(q, k.to(dtype), v.to(dtype), mask, k_scales, v_scales)


@native
def test_native_attention_of_a_row_that_sees_nothing_is_zero():
    q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 5, 16)
    mask = torch.zeros(1, 1, 2, 5, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    out = cpu_ops.ops().attention(q, k, k, mask)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 16)) and torch.allclose(out[:, :, 1], k[:, :, 2])


def test_attention_takes_its_measured_paths(tmp_path):
    from model import Attention, ModelArgs

    args = ModelArgs(dim=64, n_head=4, n_local_heads=2, n_layer=1, vocab_size=8, intermediate_size=8)
    attention = Attention(args, 0)
    attention.__class__ = decode_kernels.DecodeAttention
    choices = cpu_ops.KernelChoices(tmp_path / "choices.json")
    names = ["sdpa", "native"] if cpu_ops.load() else ["sdpa"]
    wanted = {rows: names[rows % len(names)] for rows in range(1, 9)}
    wanted[1] = "reduction"
    choices.choices.update({f"attention 4x2x16 float32 rows {rows} cache {decode_kernels.ATTENTION_TIMING_CACHE}":
                            {"path": name, "us": {}} for rows, name in wanted.items()})
    decode_kernels.choose_attention_paths([torch.nn.Sequential(attention)], choices)
    assert attention.paths == wanted
    torch.manual_seed(0)
    for rows in (1, 3):
        q, k, v = torch.randn(1, 4, rows, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
        mask = attention_mask(1, rows, 30)
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        for path in names + ["reduction"] * (rows == 1):
            assert torch.allclose(attention.run_path(path, q, k, v, mask), reference, atol=1e-5), (path, rows)


@native
def test_a_cached_native_choice_compiles_in_a_fresh_process(tmp_path):
    """With the choice read from the file, the first call of a native kernel can come inside torch.compile's
    trace: its output shape must already be known (registered when the kernels are loaded)."""
    import subprocess
    import sys

    script = f"""
import sys, torch
sys.path.insert(0, {str(cpu_ops.SOURCE.parent)!r})
import cpu_ops, quantize
module = quantize.Int4Linear.from_linear(torch.nn.Linear(64, 16), 32)
choices = cpu_ops.KernelChoices({str(tmp_path / 'c.json')!r})
key = quantize.path_key(module, torch.float32)
choices.choices.update({{f"{{key}} rows {{rows}}": {{"path": "native", "us": {{}}}} for rows in quantize.ROW_BUCKETS}})
module.prepare_for_device(torch.float32, choices)
x = torch.randn(1, 1, 64)
assert torch.equal(torch.compile(module, fullgraph=True)(x), module(x))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


@native
@pytest.mark.parametrize("flags", ["-march=haswell", "-march=x86-64"])
def test_the_branches_for_older_cpus(flags):
    """The kernels' AVX2 (maddubs) and plain C++ branches, built for an older CPU than this one
    (GPT_FAST_NATIVE_FLAGS), compute the same llama.cpp arithmetic and the same attention: run in a child
    process with that build."""
    import os
    import subprocess
    import sys

    if flags == "-march=haswell" and not {"avx2", "fma", "f16c", "bmi2"} <= set(cpu_ops.cpu_flags()):
        pytest.skip("this CPU cannot run AVX2 code")
    env = {**os.environ, "GPT_FAST_NATIVE_FLAGS": flags}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-k", "llama_cpp_arithmetic or pad_the_last_tile or native_attention or gated_feed_forward "
                                   "or gate_and_up or two_native_calls or weight_rows"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


BLOCK_LINEARS = [("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"), ("feed_forward", "w3"),
                 ("feed_forward", "w2")]


def native_block(tiny_models, family, kind, dtype, tmp_path, cache_length=32, rows=1, int8_cache=False):
    """The last block of a tiny `family` model in `dtype`, its products float or quantized as `kind` (each on
    the native kernel), with a cache (int8 with `int8_cache`) of random entries; and the rope and mask of `rows`
    positions from 9."""
    import generate

    model = generate.load_model(tiny_models[family][2], "cpu", dtype, kv_cache_dtype=torch.int8 if int8_cache else None)
    decode_kernels.swap_decode_modules([model], "whole")
    block = model.layers[-1]
    if kind != "float":
        for owner, name in BLOCK_LINEARS:
            module = LAYERS[kind](getattr(getattr(block, owner), name))
            setattr(getattr(block, owner), name, forced(module, dtype, "native", tmp_path))
    model.setup_caches(1, cache_length)
    torch.manual_seed(0)
    for cache in block.attention.kv_cache.buffers():
        if cache.dtype == torch.int8:
            cache.copy_(torch.randint(-127, 128, cache.shape))
        else:
            cache.normal_() if not int8_cache else cache.uniform_(0.005, 0.02)  # an int8 cache's scales
    position = torch.arange(9, 9 + rows)
    rope = (model.rope_cos[position].to(dtype), model.rope_sin[position].to(dtype))
    mask = model.causal_mask[None, None, position]
    if block.attention.sliding:
        mask = mask & model.window_mask[None, None, position]
    return block, rope, mask, position


def module_path_and(run, block, x, rope, mask, position):
    """(the block's module path output, the cache rows it wrote, run(x, rope, mask, position)'s output) with the
    cache as it was before each."""
    cache = block.attention.kv_cache
    before = [buffer.clone() for buffer in cache.buffers()]
    with torch.no_grad():
        reference = decode_kernels.TransformerBlock.forward(block, x, rope, mask, position)
        written = [buffer[:, :, position].clone() for buffer in cache.buffers()]
        for buffer, kept in zip(cache.buffers(), before):
            buffer.copy_(kept)
        out = run(x, rope, mask, position)
    others = [i for i in range(before[0].shape[2]) if i not in position.tolist()]
    assert all(torch.equal(buffer[:, :, others], kept[:, :, others]) for buffer, kept in zip(cache.buffers(), before))
    assert not torch.equal(written[0], before[0][:, :, position])
    return reference, written, out


@native
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["float", "int8 per channel", "int4 g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_block_in_one_native_call_computes_the_module_path(tiny_models, family, kind, dtype, rows, tmp_path):
    """decoder_block (norms, qkv with Qwen2's bias, Qwen3's q/k norms, rope, the cache write, GQA attention over
    the cache with each row's causal mask, a sliding window, wo, the gated feed-forward, both residuals), for one
    decoded token and for 3 verified ones, against the block's own modules: the same output and the same
    entries written to the cache (float32 to rounding, bfloat16 to its ulp; the quantized kinds round their
    activations to int8, where a last-bit difference in a normed input can move one rounding: 1e-3 in float32,
    seen at 2.4e-4 on the AVX-512 Xeon VM)."""
    block, rope, mask, position = native_block(tiny_models, family, kind, dtype, tmp_path, rows=rows)
    assert block.can_take_native()
    x = torch.randn(1, rows, block.attention_norm.weight.shape[0], dtype=dtype)
    reference, written, out = module_path_and(block.native_forward, block, x, rope, mask, position)
    tolerance = (1e-5 if kind == "float" else 1e-3) if dtype == torch.float32 else 1e-2
    assert out.shape == reference.shape and out.dtype == dtype
    assert relative_error(out, reference) < tolerance
    for buffer, expected in zip(block.attention.kv_cache.buffers(), written):
        assert relative_error(buffer[:, :, position], expected) < tolerance


@native
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["float", "int4 g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_one_native_call_writes_and_reads_an_int8_cache(tiny_models, family, kind, dtype, rows, tmp_path):
    """With an int8 KV cache, decoder_block rounds the new entries as model.quantize_kv does and reads entries
    and scales where the module path attends to a dequantized copy: the same output (float32 to rounding;
    bfloat16: the copy's rounding) and the same entries and scales written."""
    block, rope, mask, position = native_block(tiny_models, family, kind, dtype, tmp_path, rows=rows, int8_cache=True)
    assert block.can_take_native() and block.attention.kv_cache.quantized
    x = torch.randn(1, rows, block.attention_norm.weight.shape[0], dtype=dtype)
    reference, written, out = module_path_and(block.native_forward, block, x, rope, mask, position)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(out, reference) < tolerance
    for buffer, expected in zip(block.attention.kv_cache.buffers(), written):  # k and v rounded by either path
        if buffer.dtype == torch.int8:
            assert (buffer[:, :, position].int() - expected.int()).abs().max() <= 1
        else:
            assert relative_error(buffer[:, :, position], expected) < tolerance


@native
@pytest.mark.parametrize("block_calls", [False, True])
def test_an_int8_cache_decodes_natively_where_measured_faster(tiny_models, tmp_path, monkeypatch, block_calls):
    """The int8 cache's paths come from the choice file (here: native attention, and the block's one call or
    not); the compiled step then reads the cache through the native ops, their scales passed (seen in the
    graph dynamo hands to the backend), and decodes eager's greedy tokens (float32)."""
    import generate

    monkeypatch.setenv("GPT_FAST_CACHE", str(tmp_path))
    model = generate.load_model(tiny_models["llama"][2], "cpu", torch.float32, kv_cache_dtype=torch.int8)
    prompt = torch.tensor([3, 17, 42, 5, 9])
    eager = generate.generate(model, prompt, 24)
    decode_kernels.swap_decode_modules([model], "whole")
    attention = model.layers[0].attention
    choices = cpu_ops.KernelChoices()
    for rows in range(1, 9):
        choices.choices[f"attention int8 cache 4x2x16 float32 rows {rows} cache {decode_kernels.ATTENTION_TIMING_CACHE}"] = \
            {"path": "native", "us": {}}
    for rows in decode_kernels.BLOCK_TIMED_ROWS:
        choices.choices[decode_kernels.block_key(model.layers[0], torch.float32, rows, True)] = \
            {"path": "one call" if block_calls else "module path", "us": {}}
    choices.measured = len(choices.choices)  # written as a measured file would be
    choices.save()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(graph_module, example_inputs)

    try:
        generate.compile_functions([model], "cpu")
        assert attention.int8_cache_paths == {rows: "native" for rows in range(1, 9)}
        assert "attention 4x2x16 int8 cache: native (1-8 rows), dequantize (longer inputs)" in \
            decode_kernels.float_paths_summary([model])
        assert model.layers[0].native_rows == (frozenset(range(1, 9)) if block_calls else frozenset())
        step = generate.decode_one_token
        generate.decode_one_token = torch.compile(generate.EAGER_FUNCTIONS["decode_one_token"], backend=recording_backend,
                                                  fullgraph=True)
        assert torch.equal(generate.generate(model, prompt, 24), eager)
        generate.decode_one_token = step
    finally:
        generate.use_eager()
    op = "gptfast_cpu.decoder_block" if block_calls else "gptfast_cpu.attention"
    calls = [line for line in graphs[0].splitlines() if op in line]
    assert len(calls) == len(model.layers) and all("k_scales" in line and "v_scales" in line for line in calls), calls


@native
def test_a_compiled_block_takes_the_native_call_where_measured_faster(tiny_models, tmp_path):
    """choose_block_paths times both ways compiled and caches the choice; compiled with the one call, the
    block computes what it computes eagerly; a block whose layers carry hooks (tensor parallel's all-reduces)
    keeps the module path."""
    block, rope, mask, position = native_block(tiny_models, "qwen3", "int4 g32", torch.float32, tmp_path)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([block])
    model.args = type("Args", (), {"dim": block.attention_norm.weight.shape[0]})()
    choices = cpu_ops.KernelChoices(tmp_path / "block.json")
    decode_kernels.choose_block_paths([model], choices)
    for rows in (1, 4):
        key = decode_kernels.block_key(block, torch.float32, rows)
        assert choices.choices[key]["path"] in ("one call", "module path")
        assert set(choices.choices[key]["us"]) == {"one call", "module path"}
        assert (rows in block.native_rows) == (choices.choices[key]["path"] == "one call")
    assert (2 in block.native_rows) == (8 in block.native_rows) == (4 in block.native_rows)
    assert 9 not in block.native_rows
    assert decode_kernels.block_paths_summary([model])[0].startswith(key.removesuffix(" rows 4 compiled") + ": ")

    for rows in (1, 3):  # a decoded token, a verification of 3
        block, rope, mask, position = native_block(tiny_models, "qwen3", "int4 g32", torch.float32, tmp_path,
                                                   rows=rows)
        block.native_rows = frozenset({rows})
        block.pack_native_weights()  # (swap_decode_modules and choose_block_paths do it for a model)
        x = torch.randn(1, rows, model.args.dim)
        compiled = torch.compile(lambda *inputs: block(*inputs), fullgraph=True, dynamic=False)
        expected, written, out = module_path_and(compiled, block, x, rope, mask, position)
        assert relative_error(out, expected) < 1e-5
        assert all(relative_error(buffer[:, :, position], row) < 1e-5
                   for buffer, row in zip(block.attention.kv_cache.buffers(), written))
        graphs = []

        def recording(graph_module, inputs):
            graphs.append(str(graph_module.graph))
            return graph_module.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(lambda *inputs: block(*inputs), fullgraph=True, backend=recording)(x, rope, mask, position)
        assert graphs[0].count("decoder_block") == 1 and "int4_linear" not in graphs[0]

    model.layers = torch.nn.ModuleList([block])
    block.feed_forward.w2.register_forward_hook(lambda module, inputs, output: output)
    assert not block.can_take_native()
    decode_kernels.choose_block_paths([model], choices)
    assert not block.native_rows and decode_kernels.block_paths_summary([model]) == []


@native
def test_a_block_finds_its_weights_in_the_models_region_or_moves_them_into_its_own(tiny_models, tmp_path, monkeypatch):
    """pack_native_weights: a model loaded with its weights placed together (memory.place_in_huge_pages) gives
    every block its pieces' places in that region, nothing copied; a block without one moves its weights into a
    region of its own, the module path computing what it did; a layout that points outside the region, or at a
    piece of the wrong dtype, is refused with a clear error, not read."""
    import generate
    import memory

    monkeypatch.setattr(memory, "transparent_huge_pages", lambda: True)  # (the region, with or without THP)
    model = generate.load_model(tiny_models["qwen2"][2], "cpu", torch.float32)  # Qwen2: qkv's bias in the layout
    decode_kernels.swap_decode_modules([model], "whole")
    block = model.layers[0]
    places = [t.data_ptr() for t in block.native_pieces() if t is not None]
    assert block.native_region is model.weight_region
    assert [t.data_ptr() for t in block.native_pieces() if t is not None] == places
    assert (block.native_layout[:, 0] >= 0).sum() == len(places)

    block, rope, mask, position = native_block(tiny_models, "llama", "int4 g32", torch.float32, tmp_path)
    x = torch.randn(1, 1, block.attention_norm.weight.shape[0])
    kept = [buffer.clone() for buffer in block.attention.kv_cache.buffers()]
    with torch.no_grad():
        before = decode_kernels.TransformerBlock.forward(block, x, rope, mask, position)
        for buffer, saved in zip(block.attention.kv_cache.buffers(), kept):
            buffer.copy_(saved)
        block.pack_native_weights()
    region = block.native_region
    assert all(memory.inside(t, region) for t in block.native_pieces() if t is not None)
    block.pack_native_weights()  # again, as each compile's setup does: nothing is moved twice
    assert block.native_region is region
    with torch.no_grad():
        assert torch.equal(decode_kernels.TransformerBlock.forward(block, x, rope, mask, position), before)
    out = torch.randn(1, 1, x.shape[-1])
    cache = block.attention.kv_cache
    call = lambda layout, region=region: cpu_ops.ops().decoder_block(
        x.reshape(1, -1), region, layout, block.native_kinds, 1e-5, 1e-5, 0.0, block.attention.n_head,
        block.attention.n_local_heads, block.attention.wqkv.out_features, block.feed_forward.w1.out_features,
        rope[0], rope[1], cache.k_cache, cache.v_cache, position, mask)
    assert call(block.native_layout).shape == out.shape[1:]
    outside = block.native_layout.clone()
    outside[5, 0] = region.numel()  # qkv's tiles past the end
    with pytest.raises(RuntimeError, match="outside the region"):
        call(outside)
    wrong = block.native_layout.clone()
    wrong[0, 1] = decode_kernels.PIECE_CODES[torch.bfloat16]  # the norm said to be bfloat16
    with pytest.raises(RuntimeError, match="activations' dtype"):
        call(wrong)


@native
def test_block_timing_compiles_the_one_call_for_the_blocks_a_build_swaps_in(tiny_models, tmp_path, monkeypatch):
    """compiled_step.build_stages swaps in RegionBlocks (a region compiled alone keeps the module path); the
    whole step inlines them, and so must the timing of the one call against the module path (before: both
    timed the module path, and the choice between them was a coin toss)."""
    block, rope, mask, position = native_block(tiny_models, "llama", "int4 g32", torch.float32, tmp_path)
    block.__class__ = decode_kernels.RegionBlock
    graphs = {}

    def recording(candidates, *inputs):
        for name, run in candidates.items():
            def backend(graph_module, example_inputs, name=name):
                graphs[name] = str(graph_module.graph)
                return graph_module.forward
            torch._dynamo.reset()
            torch.compile(run, backend=backend, fullgraph=True)(*inputs)
        return {name: 1.0 for name in candidates}

    monkeypatch.setattr(cpu_ops, "time_compiled_alternately", recording)
    with torch.no_grad():
        decode_kernels.time_block(block, torch.float32, 1)
    assert "decoder_block" in graphs["one call"] and "decoder_block" not in graphs["module path"]


@native
@pytest.mark.parametrize("native_us", [110.0, 200.0])
def test_a_second_layout_is_kept_only_for_a_clearly_faster_path(native_us, tmp_path):
    """An int4 layer whose decoded rows measured ATen's kernel marginally faster than the native one takes the
    native path there (the tiles are kept for the other rows anyway) and frees ATen's packing; a clearly faster
    ATen row keeps it."""
    torch.manual_seed(0)
    module = Int4Linear.from_linear(torch.nn.Linear(256, 96, bias=False), 32)
    choices = cpu_ops.KernelChoices(tmp_path / "measured.json")
    key = quantize.path_key(module, torch.float32)
    for rows in quantize.ROW_BUCKETS:
        own = "native" if rows <= 8 else "tiles"
        times = {"aten": 100.0, own: native_us if rows == 1 else 50.0}
        choices.choices[f"{key} rows {rows}"] = {"path": "aten" if rows == 1 else own, "us": times}
    module.prepare_for_device(torch.float32, choices)
    assert module.paths[1] == ("native" if native_us < 100 * quantize.LAYOUT_MARGIN else "aten")
    assert hasattr(module, "packed") == (module.paths[1] == "aten")
