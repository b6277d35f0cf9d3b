"""Layer streaming under --memory_budget (streaming.py): the same logits and tokens as the loaded model on every
tiny family, in float32 and bfloat16, float and quantized; each streamed unit read once per forward; the budget
split as documented; a budget too small, a checkpoint cut or changed while streaming: one clear error; the
stream file reused, and rewritten when it does not fit; a budgeted process's resident memory under the budget."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import drafting
import generate
import streaming
from cli import UsageError
from quantize import quantize_checkpoint
from test_cli_errors import write_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
HUGE = 10 ** 12


def run_forwards(model, tokens, prompt_length=12):
    """A prefill and then one token at a time: every logit, concatenated."""
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        logits = [model(tokens[:, :prompt_length], torch.arange(prompt_length))]
        for pos in range(prompt_length, tokens.shape[1]):
            logits.append(model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    return torch.cat(logits, dim=1)


def replan(model, budget):
    """The same streamed model under another budget (planned again at its next forward)."""
    model.streamer.budget, model.streamer.planned_for = budget, None


def budgets(model, tokens) -> dict:
    """Budgets that take each branch of the plan, from the model's own unit sizes and fixed bytes."""
    model.setup_caches(1, tokens.shape[1])
    fixed = model.streamer.fixed_bytes()
    sizes = sorted(u.nbytes for u in model.streamer.units)
    largest = sizes[-1]
    return {"all resident": HUGE, "one slot": fixed + largest, "two slots": fixed + 2 * largest,
            "two slots and resident units": fixed + 2 * largest + sum(sizes[:-1]) // 2}


TOKENS = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A tiny Llama with six layers: enough units for a plan with resident and streamed ones side by side."""
    from transformers import LlamaConfig

    from conftest import COMMON, build_hf_model
    from convert_hf_checkpoint import convert

    folder = tmp_path_factory.mktemp("six_layers")
    build_hf_model(LlamaConfig(**{**COMMON, "num_hidden_layers": 6}, tie_word_embeddings=False)).save_pretrained(folder)
    return convert(checkpoint_dir=folder)


@pytest.mark.parametrize("family", FAMILIES + ["six layers"])
def test_streamed_logits_equal_the_loaded_model_under_every_plan(family, tiny_models, six_layers):
    """float32, streamed from the checkpoint itself: bit-identical logits, whatever part is resident."""
    checkpoint = six_layers if family == "six layers" else tiny_models[family][2]
    reference = run_forwards(generate.load_model(checkpoint, "cpu", torch.float32), TOKENS)
    model = generate.load_model(checkpoint, "cpu", torch.float32, memory_budget=HUGE)
    assert {u.source for u in model.streamer.units} == {"checkpoint"} and "stream file" not in model.streamer.paths
    plans = {}
    for name, budget in budgets(model, TOKENS).items():
        replan(model, budget)
        assert torch.equal(run_forwards(model, TOKENS), reference), name
        streamer = model.streamer
        plans[name] = (len(streamer.streamed), len(streamer.slots))
        assert streamer.counted_bytes() <= budget
    n = len(model.streamer.units)
    assert plans["all resident"] == (0, 0)
    assert plans["one slot"] == (n, 1) and plans["two slots"][1] == 2
    if family == "six layers":  # (two layers and a small output leave no room between the branches above)
        assert 0 < plans["two slots and resident units"][0] < n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["bfloat16", "int8", "int4"])
def test_converted_and_quantized_layouts_stream_from_the_stream_file(family, mode, tiny_models):
    """A float32 checkpoint run in bfloat16, or a quantized one (packed for its kernels at load): the prepared
    layers are written once to the stream file and read from it, with the loaded model's exact logits."""
    _, _, checkpoint = tiny_models[family]
    if mode != "bfloat16":
        checkpoint = quantize_checkpoint(checkpoint, mode, 32)
    dtype = torch.bfloat16
    reference = run_forwards(generate.load_model(checkpoint, "cpu", dtype), TOKENS)
    model = generate.load_model(checkpoint, "cpu", dtype, memory_budget=HUGE)
    assert "stream file" in model.streamer.paths
    for name, budget in budgets(model, TOKENS).items():
        replan(model, budget)
        assert torch.equal(run_forwards(model, TOKENS), reference), name


def test_each_streamed_unit_is_read_once_per_forward(six_layers):
    model = generate.load_model(six_layers, "cpu", torch.float32, memory_budget=HUGE)
    plan = budgets(model, TOKENS)
    replan(model, plan["two slots and resident units"])
    run_forwards(model, TOKENS)  # 1 prefill + 8 decode forwards
    streamer, forwards = model.streamer, 1 + TOKENS.shape[1] - 12
    streamed = {u.name for u in streamer.streamed}
    assert streamed and len(streamed) < len(streamer.units)
    for unit in streamer.units:
        reads = streamer.reads[unit.name]
        if unit.name in streamed:  # the first ones are read ahead for the next forward, a slot each
            assert reads in (forwards, forwards + 1), unit.name
        else:
            assert reads == 1, unit.name  # resident: read at the plan, never again
    ahead = [u.name for u in streamer.streamed if streamer.reads[u.name] > forwards]  # read for the next forward
    assert ahead == [u.name for u in streamer.streamed[:len(ahead)]] and len(ahead) <= len(streamer.slots)


def test_budget_below_one_layer_and_the_kv_cache_names_the_smallest(tiny_models):
    _, _, checkpoint = tiny_models["llama"]
    model = generate.load_model(checkpoint, "cpu", torch.float32, memory_budget=HUGE)
    smallest = budgets(model, TOKENS)["one slot"]
    replan(model, smallest - 1)
    with pytest.raises(UsageError, match=f"the smallest budget that works is {streaming.format_size(smallest)}"):
        run_forwards(model, TOKENS)
    replan(model, smallest)
    run_forwards(model, TOKENS)


def with_tokenizer(checkpoint, folder: Path) -> Path:
    copy = copy_of(checkpoint, folder)
    write_word_tokenizer(folder)
    return copy


def test_budget_errors_from_the_command_line(tiny_models, tmp_path):
    checkpoint = with_tokenizer(tiny_models["llama"][2], tmp_path / "llama")
    for budget, message in [("1kB", "the smallest budget that works is"), ("lots", "is not a size")]:
        result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint),
                                 "--memory_budget", budget, "--max_new_tokens", "4", "--device", "cpu"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1


def test_parse_size():
    assert streaming.parse_size("2GB") == 2 * 10 ** 9 and streaming.parse_size("1.5GiB") == 3 * 2 ** 29
    assert streaming.parse_size("800 mb") == 8 * 10 ** 8 and streaming.parse_size("4096") == 4096
    for bad in ("", "-1GB", "2 parsecs", "0"):
        with pytest.raises(ValueError):
            streaming.parse_size(bad)


def copy_of(checkpoint, folder: Path) -> Path:
    folder.mkdir()
    for path in checkpoint.parent.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder / checkpoint.name


def test_checkpoint_truncated_or_changed_while_streaming(tiny_models, tmp_path):
    _, _, original = tiny_models["qwen3"]
    for change in ("truncate", "rewrite"):
        checkpoint = copy_of(original, tmp_path / change)
        model = generate.load_model(checkpoint, "cpu", torch.float32, memory_budget=HUGE)
        replan(model, budgets(model, TOKENS)["one slot"])
        run_forwards(model, TOKENS)
        if change == "truncate":
            os.truncate(checkpoint, checkpoint.stat().st_size // 2)
        else:
            data = checkpoint.read_bytes()
            checkpoint.write_bytes(data)  # same bytes, a new modification time: it may not be the same file
            os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10 ** 9))
        with pytest.raises(streaming.StreamingError, match="while streaming|changed while streaming"):
            run_forwards(model, TOKENS)
        model.streamer.close()


def test_stream_file_is_reused_and_rewritten_when_it_does_not_match(tiny_models, tmp_path):
    _, _, original = tiny_models["llama"]
    checkpoint = copy_of(original, tmp_path / "copy")
    reference = run_forwards(generate.load_model(checkpoint, "cpu", torch.bfloat16), TOKENS)
    model = generate.load_model(checkpoint, "cpu", torch.bfloat16, memory_budget=HUGE)
    path = model.streamer.paths["stream file"]
    written = path.stat().st_mtime_ns
    model = generate.load_model(checkpoint, "cpu", torch.bfloat16, memory_budget=HUGE)
    assert model.streamer.paths["stream file"] == path and path.stat().st_mtime_ns == written  # reused as it is
    assert torch.equal(run_forwards(model, TOKENS), reference)
    record = path.with_suffix(".json")
    record.write_text(record.read_text().replace('torch.bfloat16', 'torch.float16'))  # a table that no longer fits
    model = generate.load_model(checkpoint, "cpu", torch.bfloat16, memory_budget=HUGE)
    assert path.stat().st_mtime_ns != written and torch.equal(run_forwards(model, TOKENS), reference)
    assert not list(path.parent.glob("*.tmp"))


def test_drafting_over_a_streamed_target_gives_greedy_tokens(tiny_models):
    """Speculative decoding (the draft model loaded, the target streamed) and prompt lookup verify several
    tokens in one streamed forward: the tokens are plain greedy decoding's."""
    _, _, checkpoint = tiny_models["qwen2"]
    prompt = TOKENS[0, :8]
    plain = generate.generate(generate.load_model(checkpoint, "cpu", torch.float32), prompt, 24)
    target = generate.load_model(checkpoint, "cpu", torch.float32, memory_budget=HUGE)
    target.setup_caches(1, 64)
    replan(target, target.streamer.fixed_bytes() + 2 * max(u.nbytes for u in target.streamer.units))
    draft = generate.load_model(checkpoint, "cpu", torch.float32)
    for drafter in (drafting.SpeculativeDrafter(draft, 3), drafting.PromptLookupDrafter(3, 2)):
        output = generate.generate(target, prompt, 24, max_seq_length=64, drafter=drafter)
        assert torch.equal(output, plain), type(drafter).__name__
    assert len(target.streamer.streamed) == len(target.streamer.units)


def test_cli_answers_the_same_with_a_budget(tiny_models, tmp_path):
    checkpoint = with_tokenizer(tiny_models["qwen2"][2], tmp_path / "qwen2")
    command = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint), "--device", "cpu",
               "--dtype", "float32", "--max_new_tokens", "24", "--prompt", "w1 w2 w3", "--ignore_eos"]
    plain = subprocess.run(command, capture_output=True, text=True, check=True)
    streamed = subprocess.run(command + ["--memory_budget", "200kB", "--compile"], capture_output=True, text=True,
                              check=True)
    assert streamed.stdout == plain.stdout and streamed.stdout.strip()
    assert "--compile is ignored with --memory_budget" in streamed.stderr
    assert "Streaming: 3 of 3 units read per forward" in streamed.stderr


PEAK = """
import sys, torch
sys.path.insert(0, {root!r})
import generate
budget = {budget}
model = generate.load_model({checkpoint!r}, "cpu", torch.float32, memory_budget=budget)
tokens = torch.randint(0, 1000, (1, 16))
model.setup_caches(1, 32)
with torch.no_grad():
    model(tokens, torch.arange(16))
    for pos in range(16, 24):
        model(tokens[:, :1], torch.tensor([pos]))
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""


def peak_kib(checkpoint, budget) -> int:
    code = PEAK.format(root=str(ROOT), checkpoint=str(checkpoint), budget=budget)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


@pytest.mark.slow
def test_resident_memory_stays_under_the_budget(tmp_path):
    """An 8-layer float32 model of 130 MB streamed under a 40 MB budget: the process's peak resident memory is
    at most the budget above the peak of the same run holding a tiny model (the torch runtime's base, +10%
    slack); loaded whole (budget above its size), the peak is the model's size above that base."""
    from transformers import LlamaConfig

    from conftest import build_hf_model
    from convert_hf_checkpoint import convert

    paths = {}
    for name, size in (("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)),
                       ("mid", dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8))):
        config = LlamaConfig(**size, num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                             max_position_embeddings=64, tie_word_embeddings=False)
        build_hf_model(config).save_pretrained(tmp_path / name)
        paths[name] = convert(checkpoint_dir=tmp_path / name)
    model_bytes = paths["mid"].stat().st_size
    assert model_bytes > 120e6
    budget = 40 * 10 ** 6
    base = peak_kib(paths["tiny"], HUGE) * 1024
    budgeted = peak_kib(paths["mid"], budget) * 1024
    whole = peak_kib(paths["mid"], HUGE) * 1024
    print(f"peak resident: base {base / 1e6:.0f} MB, budgeted {budgeted / 1e6:.0f} MB, whole {whole / 1e6:.0f} MB")
    assert budgeted - base <= 1.1 * budget, (base, budgeted)
    assert whole - base >= 0.9 * model_bytes, (base, whole)  # the measure sees a model that is held


def test_perplexity_of_a_streamed_model_is_the_loaded_models(tiny_models):
    import eval as evaluation

    _, _, checkpoint = tiny_models["mistral"]
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1))
    plain = evaluation.perplexity(generate.load_model(checkpoint, "cpu", torch.float32), tokens, 32, 16)
    model = generate.load_model(checkpoint, "cpu", torch.float32, memory_budget=HUGE)
    model.setup_caches(1, 32)
    replan(model, model.streamer.fixed_bytes() + max(u.nbytes for u in model.streamer.units))
    assert evaluation.perplexity(model, tokens, 32, 16) == plain


def test_save_generated_writes_each_tensor_in_place(tmp_path):
    """checkpoint.save_generated: a file torch.load and our loader read, holding exactly what `fill` made."""
    import checkpoint
    from model import ModelArgs, Transformer

    args = ModelArgs(vocab_size=300, dim=64, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=96)
    with torch.device("meta"):
        shapes = {name: (tuple(t.shape), torch.bfloat16) for name, t in Transformer(args).state_dict().items()}
    made = {name: torch.randn(shape).to(dtype) for name, (shape, dtype) in shapes.items()}
    checkpoint.save_generated(tmp_path / "model.pth", args, shapes, lambda name: made[name])
    loaded = checkpoint.load(tmp_path / "model.pth")
    assert loaded.args == args and all(torch.equal(loaded.state_dict[name], made[name]) for name in shapes)
    with pytest.raises(ValueError, match="not"):
        checkpoint.save_generated(tmp_path / "bad.pth", args, shapes, lambda name: made[name].float())
    assert not (tmp_path / "bad.pth").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_random_model_and_its_gguf_hold_the_same_weights(tmp_path, smollm2_checkpoint):
    """scripts/random_model.py: our checkpoint and the F16 GGUF (read back by our converter, llama.cpp's q/k
    row order undone) hold the same values (bfloat16 values are exact in float16 but for the smallest)."""
    import checkpoint
    from convert_hf_checkpoint import convert

    folder = tmp_path / "random"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/random_model.py"), "--shape", "smollm2-135m",
                             "--layers", "1", "--gguf", "--output", str(folder), "--tokenizer_from",
                             str(smollm2_checkpoint.parent)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-500:]
    ours = checkpoint.load(folder / "model.pth").state_dict
    back = checkpoint.load(convert(gguf=folder / "model.f16.gguf", checkpoint_dir=tmp_path / "back",
                                   dtype=torch.float32)).state_dict
    assert sorted(ours) == sorted(back)
    for name in ours:
        assert torch.allclose(ours[name].float(), back[name], rtol=0, atol=1e-7), name


def test_a_file_too_large_for_a_private_mapping_is_mapped_shared(tiny_models, monkeypatch):
    """The kernel refuses a private mapping larger than RAM (overcommit): checkpoint.load then maps the file
    shared, and streaming reads it the same way."""
    import checkpoint

    _, _, path = tiny_models["llama"]
    real_load, calls = torch.load, []

    def refusing_private(*args, **kwargs):
        calls.append(torch.serialization.get_default_mmap_options())
        if len(calls) == 1:
            raise RuntimeError(f"unable to mmap 29529039179 bytes from file <{path}>: Cannot allocate memory (12)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", refusing_private)
    model = generate.load_model(path, "cpu", torch.float32, memory_budget=HUGE)
    monkeypatch.setattr(torch, "load", real_load)
    import mmap
    assert calls[-1] == mmap.MAP_SHARED and len(calls) == 2
    reference = run_forwards(generate.load_model(path, "cpu", torch.float32), TOKENS)
    assert torch.equal(run_forwards(model, TOKENS), reference)
    assert checkpoint.load(path).args == model.args
