"""The CUDA paths, where a GPU is (skipped elsewhere), against the same oracles as on the CPU: HF transformers on
the same weights for the model, the dequantized weights for the int8/int4 layers, plain greedy decoding for
drafting and for the compiled step (CUDA graphs)."""
import copy

import pytest
import torch

import checkpoint
import drafting
import generate
from drafting import MedusaDrafter, PromptLookupDrafter, SpeculativeDrafter
from eval import perplexity
from medusa import parse_tree
from model import Transformer
from quantize import dequantize_int4, dequantize_int8, quantize_checkpoint, unpack_int4
from test_drafting import random_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENGTH, LENGTH = 12, 40


@pytest.fixture(autouse=True)
def eager_afterwards():
    """compile_functions rebinds generate's step functions: give the next test the eager ones back, and a fresh
    dynamo cache (this file compiles the one decode step for some 20 models: past dynamo's recompile limit)."""
    yield
    generate.use_eager()
    torch._dynamo.reset()


def step_by_step_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill the first PROMPT_LENGTH tokens, then one token at a time through the KV cache."""
    device = tokens.device
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        logits = [model(tokens[:, :PROMPT_LENGTH], torch.arange(PROMPT_LENGTH, device=device))]
        for pos in range(PROMPT_LENGTH, tokens.shape[1]):
            logits.append(model(tokens[:, pos:pos + 1], torch.tensor([pos], device=device)))
    return torch.cat(logits, dim=1).float()


def random_tokens(length=LENGTH, seed=1, device=CUDA):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


def relative_error(y, reference) -> float:
    return float((y.float().cpu() - reference.float().cpu()).norm() / reference.float().cpu().norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_hf_on_cuda(family, tiny_models):
    hf_model, _, path = tiny_models[family]
    hf_cuda = copy.deepcopy(hf_model).to(CUDA)
    model = generate.load_model(path, CUDA, torch.float32)
    prompt = random_tokens(PROMPT_LENGTH)[0]
    ours = generate.generate(model, prompt, LENGTH - PROMPT_LENGTH)[0]
    with torch.no_grad():
        theirs = hf_cuda.generate(prompt[None], max_new_tokens=LENGTH - PROMPT_LENGTH,
                                  min_new_tokens=LENGTH - PROMPT_LENGTH, do_sample=False, pad_token_id=0)[0]
        reference = hf_cuda(ours[None]).logits.float()
    assert ours.tolist() == theirs.tolist(), "greedy tokens differ from HF's on the GPU"
    logits = step_by_step_logits(model, ours[None])
    assert (logits - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_step_with_cuda_graphs_equals_eager(family, tiny_models):
    """generate.py --compile on CUDA: mode="reduce-overhead" (CUDA graphs); float32 greedy tokens as eager's,
    and bfloat16 logits near float32's."""
    _, _, path = tiny_models[family]
    model = generate.load_model(path, CUDA, torch.float32)
    prompt = random_tokens(PROMPT_LENGTH)[0]
    eager = generate.generate(model, prompt, 30)
    generate.compile_functions([model], CUDA)
    for _ in range(2):  # the second run replays the recorded graphs
        assert torch.equal(generate.generate(model, prompt, 30), eager)
    bf16 = generate.load_model(path, CUDA, torch.bfloat16)
    tokens = random_tokens()
    assert relative_error(step_by_step_logits(bf16, tokens), step_by_step_logits(model, tokens)) < 2e-2


def dequantized_reference(path, quantized_path) -> Transformer:
    """The float model holding exactly the weights the quantized file dequantizes to (float32, on the CPU; an
    int8 output projection beside float tied embeddings gets its own weight)."""
    reference = generate.load_model(path, "cpu", torch.float32)
    ckpt = checkpoint.load(quantized_path)
    for name, tensor in ckpt.state_dict.items():
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem + ".scales" in ckpt.state_dict:
            scales = ckpt.state_dict[stem + ".scales"]
            weight = dequantize_int8(tensor, scales) if tensor.dtype == torch.int8 else \
                dequantize_int4(unpack_int4(tensor), scales, ckpt.state_dict[stem + ".zeros"],
                                ckpt.quantization["groupsize"])
            reference.get_submodule(stem).weight = torch.nn.Parameter(weight.float())
    return reference


@pytest.mark.parametrize("mode,int8_groupsize,tolerance", [("int8", None, 1e-4), ("int8", 32, 1e-4), ("int4", None, 2e-2)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_layers_on_cuda_match_the_dequantized_weights(family, mode, int8_groupsize, tolerance, tiny_models):
    """int8 (inductor's dequantizing matmul) in float32; int4 through tinygemm (_weight_int4pack_mm, bfloat16
    activations and scales), also for widths (96) it tiles with 2 inner k tiles only."""
    _, _, path = tiny_models[family]
    quantized_path = quantize_checkpoint(path, mode, 32, int8_groupsize=int8_groupsize)
    model = generate.load_model(quantized_path, CUDA, torch.float32)
    reference = dequantized_reference(path, quantized_path)
    tokens = random_tokens()
    error = relative_error(step_by_step_logits(model, tokens), step_by_step_logits(reference, tokens.cpu()))
    assert error < tolerance, error
    prompt = tokens[0, :PROMPT_LENGTH]
    eager = generate.generate(model, prompt, 20)
    generate.compile_functions([model], CUDA)
    compiled = generate.generate(model, prompt, 20)
    if mode == "int8":  # float32 throughout: the compiled step must pick the same tokens
        assert torch.equal(compiled, eager)
    bf16 = generate.load_model(quantized_path, CUDA, torch.bfloat16)
    assert relative_error(step_by_step_logits(bf16, tokens), step_by_step_logits(reference, tokens.cpu())) < 3e-2


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_drafting_on_cuda_equals_plain_greedy(family, compiled, tiny_models):
    """Speculative (int4 draft), prompt lookup and Medusa on the GPU: exactly plain greedy's tokens (float32)."""
    _, _, path = tiny_models[family]
    model = generate.load_model(path, CUDA, torch.float32)
    draft = generate.load_model(quantize_checkpoint(path, "int4", 32), CUDA, torch.float32)
    phrase = random_tokens(8, seed=3)[0]
    prompt = torch.cat([phrase, phrase[:5], random_tokens(4, seed=4)[0]])
    plain = generate.generate(model, prompt, 40)
    heads = random_heads(model).to(CUDA)
    drafters = {"speculative": lambda: SpeculativeDrafter(draft, 4),
                "lookup": lambda: PromptLookupDrafter(4, 3),
                "medusa": lambda: MedusaDrafter(heads, parse_tree("tree4"))}
    for name, make in drafters.items():
        drafter = make()
        if compiled:
            generate.compile_functions([model, *drafter.models], CUDA, drafter=drafter)
        timings = {}
        drafted = generate.generate(model, prompt, 40, drafter=drafter, timings=timings)
        assert torch.equal(drafted, plain), name
        generate.use_eager()
    drafting.use_eager_drafting()


def test_int8_kv_cache_on_cuda(tiny_models):
    """--kv_cache_dtype int8 on the GPU: logits near the float cache's, and the same cache bytes halved."""
    _, _, path = tiny_models["llama"]
    tokens = random_tokens()
    float_model = generate.load_model(path, CUDA, torch.float32)
    int8_model = generate.load_model(path, CUDA, torch.float32, kv_cache_dtype=torch.int8)
    error = relative_error(step_by_step_logits(int8_model, tokens), step_by_step_logits(float_model, tokens))
    assert error < 2e-2, error
    prompt = tokens[0, :PROMPT_LENGTH]
    eager = generate.generate(int8_model, prompt, 20)
    generate.compile_functions([int8_model], CUDA)
    assert torch.equal(generate.generate(int8_model, prompt, 20), eager)


def test_perplexity_on_cuda_equals_cpu(tiny_models):
    _, _, path = tiny_models["qwen2"]
    tokens = random_tokens(200, seed=5)[0]
    on_gpu, scored = perplexity(generate.load_model(path, CUDA, torch.float32), tokens, 64, 32)
    on_cpu, scored_cpu = perplexity(generate.load_model(path, "cpu", torch.float32), tokens.cpu(), 64, 32)
    assert scored == scored_cpu and abs(on_gpu - on_cpu) < 1e-4 * on_cpu
