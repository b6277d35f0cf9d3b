"""The int8 KV cache (--kv_cache_dtype int8): its rounding, attention through it against the float cache, greedy
tokens on every tiny family, drafting and Medusa's slot moves through it, and its bytes."""
import pytest
import torch

import drafting
import generate
import memory
from model import KVCache, quantize_kv

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def test_quantize_kv_rounds_to_nearest_per_token_and_head():
    torch.manual_seed(0)
    values = torch.randn(2, 3, 5, 64) * torch.logspace(-3, 2, 5)[:, None]  # tokens of very different magnitudes
    values[0, 1, 2] = 0  # an all-zero head: zeros back, no division by zero
    quantized, scales = quantize_kv(values)
    assert quantized.dtype == torch.int8 and scales.shape == (2, 3, 5, 1) and scales.dtype == torch.float32
    restored = quantized * scales
    assert torch.equal(restored[0, 1, 2], torch.zeros(64))
    assert ((restored - values).abs() <= scales / 2 * (1 + 1e-5)).all()  # half a step, each head its own step
    assert quantized.abs().amax(-1)[scales[..., 0] > 1e-9].eq(127).all()  # each head's largest value is +-127


def test_cache_update_and_move_keep_entries_and_scales_together():
    cache = KVCache(1, 8, 2, 4, torch.float32, quantized=True)  # 8 slots, 2 heads
    k = torch.randn(1, 2, 3, 4) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    k_out, v_out = cache.update(torch.tensor([1, 4, 6]), k, -k)
    assert k_out.dtype == torch.float32 and k_out.shape == (1, 2, 8, 4)
    assert torch.allclose(k_out[:, :, [1, 4, 6]], k, rtol=0, atol=float(k.abs().max()) / 254 + 1e-6)
    assert torch.equal(k_out[:, :, [0, 2, 3, 5, 7]], torch.zeros(1, 2, 5, 4))  # unwritten slots stay zero
    cache.move(torch.tensor([4, 6]), torch.tensor([2, 3]))  # Medusa's accepted path: entries and scales move
    k_moved, v_moved = (cache.k_cache * cache.k_scales), (cache.v_cache * cache.v_scales)
    assert torch.equal(k_moved[:, :, [2, 3]], k_out[:, :, [4, 6]]) and torch.equal(v_moved[:, :, 3], v_out[:, :, 6])


def attention_outputs(model, tokens, prompt_length):
    """The first layer's attention output at every position: a prefill, then one token at a time."""
    outputs = []
    hook = model.layers[0].attention.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        logits = [model(tokens[:, :prompt_length], torch.arange(prompt_length))]
        for pos in range(prompt_length, tokens.shape[1]):
            logits.append(model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    hook.remove()
    return torch.cat(outputs, dim=1), torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_cache_attention_and_greedy_tokens_match_the_float_cache(family, tiny_models):
    """float32 model: the first layer's attention output (which sees the same inputs with either cache) within 2%
    of its scale, the logits within 2% of theirs (about 0.5% here), and 32 greedy tokens identical. (The tiny
    random models have near-ties: a greedy path whose top two logits come closer than the rounding's effect,
    about 0.01, can turn; the prompt of seed 3 does so on qwen3 at its sixth token, with a margin of 0.0016.)"""
    _, _, checkpoint = tiny_models[family]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    int8_model = generate.load_model(checkpoint, "cpu", torch.float32, kv_cache_dtype=torch.int8)
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    (attention, logits), (int8_attention, int8_logits) = (attention_outputs(m, tokens, 12) for m in (model, int8_model))
    assert all(layer.attention.kv_cache.k_cache.dtype == torch.int8 for layer in int8_model.layers)
    assert not torch.equal(attention, int8_attention)  # the cache is really rounded
    assert (int8_attention - attention).abs().max() < 0.02 * attention.abs().max()
    assert (int8_logits - logits).abs().max() < 0.02 * logits.abs().max()

    prompt = tokens[0, :12]
    assert torch.equal(generate.generate(int8_model, prompt, 32), generate.generate(model, prompt, 32))


def test_drafting_through_the_int8_cache_equals_its_plain_greedy(tiny_models):
    """Verification writes several tokens' K/V at once; each is rounded as when written one by one, so
    speculative decoding and prompt lookup give plain greedy decoding's tokens with the int8 cache too."""
    _, _, checkpoint = tiny_models["llama"]
    load = lambda: generate.load_model(checkpoint, "cpu", torch.float32, kv_cache_dtype=torch.int8)
    model = load()
    prompt = torch.tensor([5, 6, 7, 8, 5, 6, 7, 8, 5, 6])
    plain = generate.generate(model, prompt, 30)
    for drafter in (drafting.SpeculativeDrafter(load(), 4), drafting.PromptLookupDrafter(4, 3)):
        assert torch.equal(generate.generate(model, prompt, 30, drafter=drafter), plain)


def test_int8_cache_bytes(tiny_models):
    """memory.cache_bytes predicts what setup_caches allocates; int8 holds 1 + 4/head_dim bytes per value."""
    _, _, checkpoint = tiny_models["qwen3"]
    sizes = {}
    for kv_cache_dtype in (None, torch.int8):
        model = generate.load_model(checkpoint, "cpu", torch.bfloat16, kv_cache_dtype=kv_cache_dtype)
        predicted, _ = memory.cache_bytes(model, 2, 64)
        model.setup_caches(2, 64)
        sizes[kv_cache_dtype] = memory.memory_figures(model, "cpu")["cache_bytes"]
        assert sizes[kv_cache_dtype] == predicted
    head_dim = model.args.head_dim
    assert sizes[torch.int8] / sizes[None] == pytest.approx((head_dim + 4) / (2 * head_dim))


def test_cli_flag(smollm2_checkpoint, capsys):
    """generate.py --kv_cache_dtype int8 --report_memory on the real model: the float cache's answer, and a KV
    cache of about a quarter of float32's in the memory table."""
    reports = {}
    for flag in ("auto", "int8"):
        generate.main(["--checkpoint_path", str(smollm2_checkpoint), "--chat", "--prompt",
                       "What is the capital of France?", "--max_new_tokens", "12", "--dtype", "float32",
                       "--kv_cache_dtype", flag, "--report_memory"])
        reports[flag] = capsys.readouterr()
    assert "Paris" in reports["int8"].out and reports["int8"].out == reports["auto"].out
    row = {flag: next(line for line in report.err.splitlines() if line.startswith("| ") and " MB |" in line)
           for flag, report in reports.items()}
    kv_megabytes = {flag: float(line.split("|")[3].split()[0]) for flag, line in row.items()}
    assert kv_megabytes["int8"] == pytest.approx(kv_megabytes["auto"] * (64 + 4) / (4 * 64), rel=0.02)
