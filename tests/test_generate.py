"""generate.py: sampling, the CLI on the real model (eager and compiled), and its errors."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import decode_kernels
from sampling import logits_to_probs, sample

ROOT = Path(__file__).resolve().parent.parent


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, temperature=1.0, top_k=2)
    assert torch.equal(probs > 0, torch.tensor([[False, True, True, False, False]]))
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = logits_to_probs(probs_in.log(), temperature=1.0, top_p=0.7)
    assert torch.equal(probs > 0, torch.tensor([[True, True, False, False]]))  # 0.5 < 0.7 <= 0.8
    assert torch.allclose(probs[0, :2], torch.tensor([0.5, 0.3]) / 0.8)


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)[:, None, :]
    tokens, _ = sample(logits, temperature=1.0)
    frequencies = torch.bincount(tokens[:, 0], minlength=3).float() / 20000
    assert torch.allclose(frequencies, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1), atol=0.015)


def test_greedy_is_argmax():
    logits = torch.randn(4, 3, 50)
    tokens, _ = sample(logits, temperature=0)
    assert torch.equal(tokens[:, 0], logits[:, -1].argmax(-1))


def run_cli(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def main_exit(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = main_exit(["--checkpoint_path", tmp_path / "model.pth"], capsys)
    assert code == 2 and "checkpoint" in err and "not found" in err and "prepare.sh" in err


def test_not_our_checkpoint(tmp_path, capsys):
    torch.save({"some": torch.zeros(2)}, tmp_path / "model.pth")
    (tmp_path / "tokenizer.json").write_text("{}")
    code, err = main_exit(["--checkpoint_path", tmp_path / "model.pth"], capsys)
    assert code == 2 and "not a checkpoint written by convert_hf_checkpoint.py" in err


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = main_exit(flags, capsys)
    assert code == 2 and message in err


@pytest.mark.slow
def test_prompt_longer_than_cache(smollm2_checkpoint, capsys):
    code, err = main_exit(["--checkpoint_path", smollm2_checkpoint, "--prompt", "one two three four five six",
                           "--max_seq_length", "4"], capsys)
    assert code == 2 and "the prompt is" in err and "raise --max_seq_length" in err
    assert err.strip().count("\n") == 1  # the "Loaded" line, then the one error line


@pytest.mark.slow
def test_chat_answers_paris_eager_and_compiled_identically(smollm2_checkpoint):
    """The real model answers the capital question; the compiled decode gives exactly the eager tokens. The
    answer runs on past EOS: a saved step is loaded beside the eager decode once that has run
    compiled_step.LOAD_AFTER_S (a shorter answer never needs it), then takes over."""
    prompt = "What is the capital of France? Answer, then name three famous monuments there."
    common = ["--checkpoint_path", smollm2_checkpoint, "--chat", "--prompt", prompt, "--dtype", "float32",
              "--max_new_tokens", "120", "--ignore_eos"]
    eager = run_cli(*common)
    built = run_cli(*common, "--compile_only", "--compile_mode", "whole")  # saved next to the checkpoint
    compiled = run_cli(*common, "--compile", "--compile_mode", "whole")  # loaded: every token compiled
    assert eager.returncode == 0, eager.stderr
    assert built.returncode == 0 and "compiled step whole:" in built.stderr, built.stderr
    assert compiled.returncode == 0, compiled.stderr
    assert "Paris" in eager.stdout
    assert compiled.stdout == eager.stdout
    assert re.search(r"Compiled step: tokens 2-\d+ eager, \d+-120 whole \(loaded [\d.]+ s after start\)\n", compiled.stderr)
    assert "tok/s" in compiled.stderr and "GB/s" in compiled.stderr and "peak memory" in compiled.stderr


@pytest.mark.slow
def test_compile_answers_at_once_with_the_eager_step(smollm2_checkpoint, tmp_path):
    """With nothing saved, --compile does not wait for the compiler: a short answer is all eager, and the
    build process stops with the run."""
    (tmp_path / "model.pth").symlink_to(smollm2_checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_checkpoint.parent / name).exists():
            (tmp_path / name).symlink_to(smollm2_checkpoint.parent / name)
    result = run_cli("--checkpoint_path", tmp_path / "model.pth", "--chat", "--prompt", "What is the capital of France?",
                     "--max_new_tokens", "12", "--compile", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "eager; regional, whole building" in result.stderr


@pytest.mark.slow
def test_chat_stops_at_eos_bfloat16(smollm2_checkpoint):
    result = run_cli("--checkpoint_path", smollm2_checkpoint, "--chat", "--prompt", "What is the capital of France?",
                     "--max_new_tokens", "100")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    generated = int(result.stderr.split("Generated ")[1].split(" tokens")[0])
    assert generated < 100  # stopped at <|im_end|>, not at the token limit
    assert "<|im_end|>" not in result.stdout


def test_compile_only_refuses_drafting(tiny_models, capsys):
    _, _, checkpoint = tiny_models["llama"]
    code, err = main_exit(["--checkpoint_path", checkpoint, "--compile_only", "--prompt_lookup_num_tokens", "3"], capsys)
    assert code == 2 and "--compile_only builds the plain decode step" in err


def test_corrupt_tokenizer(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    (tmp_path / "model.pth").symlink_to(checkpoint)
    (tmp_path / "tokenizer.json").write_text("{}")
    code, err = main_exit(["--checkpoint_path", tmp_path / "model.pth"], capsys)
    assert code == 2 and "cannot read the tokenizer" in err


@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_linear(bias):
    """The CPU decode GEMV (a reduction inductor fuses) computes the same product as F.linear."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias)
    reference = linear(torch.randn(3, 5, 48))
    decode = torch.nn.Linear(48, 40, bias=bias)
    decode.load_state_dict(linear.state_dict())
    decode.__class__ = decode_kernels.DecodeLinear
    x = torch.randn(3, 1, 48)
    assert torch.allclose(decode(x), linear(x), atol=1e-5)
    x = torch.randn(3, 5, 48)  # prefill-shaped input takes the matmul
    assert torch.equal(decode(x), linear(x))
    assert reference.shape == (3, 5, 40)



def test_grouped_query_attention_equals_repeated_heads():
    """attend() shares each KV head across its query group (enable_gqa) instead of copying the cache."""
    from model import Attention, ModelArgs

    args = ModelArgs(dim=64, n_head=6, n_local_heads=2, n_layer=1, vocab_size=8, intermediate_size=8)
    attention = Attention(args, 0)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 32), torch.randn(2, 2, 20, 32), torch.randn(2, 2, 20, 32)
    mask = torch.zeros(1, 1, 4, 20, dtype=torch.bool)
    mask[..., 3:13] = True  # a window of the cache, as a sliding window or a partly filled cache gives
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask)
    assert torch.allclose(attention.attend(q, k, v, mask), reference, atol=1e-5)
    attention.__class__ = decode_kernels.DecodeAttention  # the CPU compiled decode's version, one query row
    assert torch.allclose(attention.attend(q[:, :, :1], k, v, mask[:, :, :1]), reference[:, :, :1], atol=1e-5)
    assert torch.allclose(attention.attend(q, k, v, mask), reference, atol=1e-5)  # longer: falls back to SDPA


def tokenizer_without_template(folder):
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import models

    FastTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


def test_chat_without_template(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    (tmp_path / "model.pth").symlink_to(checkpoint)
    tokenizer_without_template(tmp_path)
    code, err = main_exit(["--checkpoint_path", tmp_path / "model.pth", "--chat", "--prompt", "a"], capsys)
    assert code == 2 and "has no chat template; drop --chat" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_cuda(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    code, err = main_exit(["--checkpoint_path", checkpoint, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device is available" in err


def test_bench_unknown_row(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rows", "ours-int3"])
    assert exit_info.value.code == 2 and "unknown row 'ours-int3'" in capsys.readouterr().err


def test_bench_llamacpp_crash_retried_without_extra_buffers(tmp_path, monkeypatch):
    """llama.cpp killed by a signal (its AMX path segfaults on some VMs) costs one retry with its extra buffer
    types off, noted in the row; a second failure, or a plain error exit, is one clear error."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(bench, "llamacpp_gguf", lambda source, bench_dir, type_name: gguf)
    calls = []

    def child(path, prompt_ids, new_tokens, runs, threads, extra_buffers):
        calls.append(extra_buffers)
        if extra_buffers:
            return None, -11, ""
        return [(50.0, [1, 2]), (52.0, [1, 2])], 0, ""

    monkeypatch.setattr(bench, "llamacpp_child", child)
    speeds, tokens, notes = bench.bench_llamacpp(gguf, "Q8_0", [1], 3, 2, 2, tmp_path)
    assert calls == [True, False] and speeds == [50.0, 52.0] and tokens == [1, 2]
    assert notes == ["extra buffer types off: with them llama.cpp crashed (SIGSEGV) here"]

    monkeypatch.setattr(bench, "llamacpp_child", lambda *args: (None, 1, "bad magic"))
    with pytest.raises(bench.BenchError, match="llama.cpp failed on .* \\(exit status 1\\): bad magic"):
        bench.bench_llamacpp(gguf, "Q8_0", [1], 3, 2, 2, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_bench_llamacpp_child_process(smollm2_gguf):
    """The child protocol end to end: SmolLM2's GGUF decoded greedily by llama.cpp in a child process, its
    extra buffer types off (the way that ran on every machine so far)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    results, status, stderr = bench.llamacpp_child(smollm2_gguf, [1, 2, 3], 4, 2, 2, False)
    assert status == 0, stderr
    assert len(results) == 2 and all(speed > 0 and len(tokens) == 4 for speed, tokens in results)
    assert results[0][1] == results[1][1]  # greedy: the same tokens every run


def test_dtype_the_device_cannot_run(tiny_models, monkeypatch, capsys):
    """A 16-bit type without kernels on the device (old GPUs, some CPU builds) is refused before loading."""
    _, _, checkpoint = tiny_models["llama"]
    matmul = torch.Tensor.__matmul__

    def no_float16(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_float16)
    code, err = main_exit(["--checkpoint_path", checkpoint, "--dtype", "float16"], capsys)
    assert code == 2 and "--dtype float16 cannot run on cpu" in err and "use --dtype float32" in err
    assert "Loaded" not in err


def test_ignore_eos_never_checks_for_a_stop(tiny_models, monkeypatch):
    """With no stop ids (--ignore_eos, benchmarks) the decode loop runs no per-token stop check (a device sync
    on CUDA); with stop ids it checks every token."""
    _, _, checkpoint = tiny_models["llama"]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    calls, isin = [], torch.isin
    monkeypatch.setattr(generate.torch, "isin", lambda *a, **k: calls.append(1) or isin(*a, **k))
    generate.generate(model, torch.arange(4), 10, stop_ids=())
    unchecked = len(calls)
    generate.generate(model, torch.arange(4), 10, stop_ids=(300,))
    assert unchecked == 1 and len(calls) - unchecked == 1 + 9  # the prefill token's check, then one per decoded token


@pytest.mark.slow
@pytest.mark.parametrize("mode", decode_kernels.COMPILE_MODES)
def test_compile_modes_give_eager_tokens(tiny_models, mode):
    """Both CPU compile modes decode exactly eager's greedy tokens in float32 (Qwen2: windowed upper layers,
    qkv bias), with the float and the int8 KV cache: "regional" swaps every block for the one compiled region,
    "whole" for DecodeBlocks (a float32 block there may take its one native call) and inductor's C++ wrapper."""
    _, _, checkpoint = tiny_models["qwen2"]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    int8_cache = generate.load_model(checkpoint, "cpu", torch.float32, kv_cache_dtype=torch.int8)
    prompt = torch.tensor([3, 17, 42, 5, 9])
    eager, eager_int8_cache = (generate.generate(m, prompt, 24) for m in (model, int8_cache))
    try:
        generate.compile_functions([model, int8_cache], "cpu", mode=mode)
        block_class = decode_kernels.RegionBlock if mode == "regional" else decode_kernels.DecodeBlock
        assert all(type(layer) is block_class for layer in model.layers)
        assert torch._inductor.config.cpp_wrapper == (mode == "whole")
        assert torch.equal(generate.generate(model, prompt, 24), eager)
        assert torch.equal(generate.generate(int8_cache, prompt, 24), eager_int8_cache)  # --kv_cache_dtype int8
    finally:
        generate.use_eager()
