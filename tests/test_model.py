"""Our model against HF transformers on the same (converted) weights, float32."""
import math

import pytest
import torch

from generate import generate, load_model
from model import ModelArgs, Transformer, rope_inverse_frequencies

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENGTH, DECODE_STEPS = 12, 32


def step_by_step_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill the prompt, then feed one token at a time through the KV cache: logits at every position."""
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        logits = [model(tokens[:, :PROMPT_LENGTH], torch.arange(PROMPT_LENGTH))]
        for pos in range(PROMPT_LENGTH, tokens.shape[1]):
            logits.append(model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_hf(family, tiny_models):
    hf_model, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.randint(0, 256, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(1))

    ours = generate(model, prompt, DECODE_STEPS)[0]
    with torch.no_grad():
        theirs = hf_model.generate(prompt[None], max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS,
                                   do_sample=False, pad_token_id=0)[0]
    assert ours.tolist() == theirs.tolist(), "greedy tokens differ from HF"

    sequence = ours[None]
    with torch.no_grad():
        reference = hf_model(sequence).logits
    logits = step_by_step_logits(model, sequence)
    # Prefill rows, then each of the decode steps, all within 1e-4 max abs diff.
    assert (logits[:, :PROMPT_LENGTH] - reference[:, :PROMPT_LENGTH]).abs().max() < 1e-4
    per_step = (logits[0, PROMPT_LENGTH:] - reference[0, PROMPT_LENGTH:]).abs().amax(dim=-1)
    assert per_step.numel() == DECODE_STEPS
    assert per_step.max() < 1e-4, f"decode step {int(per_step.argmax())} differs by {float(per_step.max())}"


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_is_in_force(family, tiny_models):
    """The window must change the numbers on a sequence longer than it (else the test above proves nothing)."""
    _, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    assert model.args.sliding_window == 8
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    windowed = step_by_step_logits(model, tokens)
    model.args.sliding_window = None
    model.max_seq_length = -1  # rebuild masks without the window
    for layer in model.layers:
        layer.attention.sliding = False
    unwindowed = step_by_step_logits(model, tokens)
    assert torch.allclose(windowed[:, :8], unwindowed[:, :8], atol=1e-5)  # inside the window: identical
    assert (windowed[:, 9:] - unwindowed[:, 9:]).abs().max() > 1e-3  # past it: different


def test_model_args_from_hf_configs():
    """Shapes come from the config: explicit head_dim, GQA, tied embeddings, bias, q/k norm, window per layer."""
    qwen3 = ModelArgs.from_hf_config({"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
                                      "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                                      "head_dim": 128, "intermediate_size": 3072, "rms_norm_eps": 1e-6,
                                      "rope_theta": 1000000, "tie_word_embeddings": True,
                                      "sliding_window": None, "use_sliding_window": False})
    assert (qwen3.head_dim, qwen3.n_local_heads, qwen3.qk_norm, qwen3.attention_bias) == (128, 8, True, False)
    assert qwen3.tie_word_embeddings and qwen3.sliding_window is None and qwen3.rope_base == 1e6
    qwen2 = ModelArgs.from_hf_config({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
                                      "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "intermediate_size": 96, "use_sliding_window": True, "sliding_window": 32,
                                      "max_window_layers": 2})
    assert qwen2.attention_bias and qwen2.head_dim == 16
    assert qwen2.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    mistral = ModelArgs.from_hf_config({"model_type": "mistral", "vocab_size": 100, "hidden_size": 64,
                                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                                        "intermediate_size": 96, "sliding_window": 4096})
    assert mistral.sliding_window == 4096 and set(mistral.layer_types) == {"sliding_attention"}
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelArgs.from_hf_config({**{"model_type": "llama", "vocab_size": 1, "hidden_size": 8, "num_hidden_layers": 1,
                                     "num_attention_heads": 1, "intermediate_size": 8},
                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"type": "linear", "factor": 4.0},  # the older key name
])
def test_rope_scaling_matches_hf_for_legacy_configs(rope_scaling):
    """Hub checkpoints (Llama 3.1) carry `rope_theta` + `rope_scaling`; HF computes the frequencies we must equal."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 1,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "rope_theta": 500000.0, "rope_scaling": rope_scaling}
    args = ModelArgs.from_hf_config(config)
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    reference, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    ours = rope_inverse_frequencies(args)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(ours, reference)
    assert not torch.allclose(ours, plain)  # the scaling really changed something
    assert math.isclose(args.rope_base, 500000.0)


def test_batch_rows_equal_single_row(tiny_models):
    _, _, checkpoint = tiny_models["qwen3"]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.arange(10)
    single = generate(model, prompt, 16)
    batched = generate(model, prompt, 16, batch_size=3)
    assert all(batched[row].tolist() == single[0].tolist() for row in range(3))


def test_generation_stops_at_eos(tiny_models):
    """A stop token ends decoding: the output is cut right after it, not padded to max_new_tokens."""
    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.arange(5)
    full = generate(model, prompt, 20)[0, 5:].tolist()
    stop = full[6]
    first = full.index(stop)
    stopped = generate(model, prompt, 20, stop_ids=[stop])[0, 5:].tolist()
    assert stopped == full[:first + 1]


def test_batch_of_different_prompts(tiny_models):
    """A [batch, T] prompt decodes each row as it would alone."""
    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompts = torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    together = generate(model, prompts, 8)
    for row in range(2):
        assert together[row].tolist() == generate(model, prompts[row], 8)[0].tolist()
