"""scripts/qat.py: data-free QAT on the tiny models. Its data follows LLM-QAT's greedy-then-sample rule and is
deterministic under a seed; a few steps lower the distillation loss; the written checkpoint dequantizes to
exactly the weights the fake-quantized student computed with; an interrupted run resumes where it stopped and
ends with the weights of an uninterrupted one; bad input is one error line."""
import sys
from pathlib import Path

import pytest
import torch

import generate
import quantize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import qat  # noqa: E402


def test_self_generated_data_is_greedy_then_sampled_and_seeded(tiny_models):
    _, _, checkpoint = tiny_models["llama"]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    tokens = quantize.self_generated_text(model, 6, 20, seed=3, greedy_tokens=(3, 5), progress=False)
    assert tokens.shape == (6, 20)
    assert torch.equal(tokens, quantize.self_generated_text(model, 6, 20, seed=3, greedy_tokens=(3, 5), progress=False))
    assert not torch.equal(tokens, quantize.self_generated_text(model, 6, 20, seed=4, greedy_tokens=(3, 5),
                                                                progress=False))
    model.setup_caches(6, 20)
    with torch.no_grad():
        greedy = model(tokens, torch.arange(20)).argmax(-1)  # each position's greedy next token
    follows_greedy = tokens[:, 1:] == greedy[:, :-1]
    assert follows_greedy[:, :3].all()  # tokens 2-4 of every row are greedy (3 at least, 5 at most)
    assert not follows_greedy[:, 5:].all(dim=1).any()  # after the sixth token, every row has sampled something


def tiny_run(checkpoint, *extra):
    return ["--checkpoint_path", str(checkpoint), "--mode", "int4", "--groupsize", "32", "--samples", "8",
            "--length", "32", "--batch_size", "4", "--lr", "1e-4", "--warmup", "0", *map(str, extra)]


def test_steps_lower_the_loss_and_the_file_is_the_student(tiny_models, tmp_path):
    """30 steps on the tiny Llama (int4 g32, 8-bit activations): the distillation loss over all the data falls;
    the written file's int4 codes dequantize to the student's rounded weights bit for bit, its record carries
    the activation bits, and its logits (through the bfloat16 int4 kernels) are the student's."""
    _, _, checkpoint = tiny_models["llama"]
    args = qat.parse_args(tiny_run(checkpoint, "--steps", 30, "--activation_bits", 8))
    teacher = generate.load_model(checkpoint, "cpu", torch.float32)
    data = quantize.self_generated_text(teacher, 8, 32, seed=0, greedy_tokens=qat.GREEDY_TOKENS, progress=False)
    quantization = quantize.plan(teacher, "int4", 32)
    student = generate.load_model(checkpoint, "cpu", torch.float32)
    quantize.swap_for_qat(student, quantization, activation_bits=8)
    for model in (teacher, student):
        qat.prepare_for_training(model, 32, 8)
    positions = torch.arange(32)

    def loss():
        with torch.no_grad():
            return float(qat.distillation_loss(student(data, positions), teacher(data, positions)))

    before = loss()
    result = qat.train(student, teacher, data, args, tmp_path / "state", log=lambda line: None)
    after = loss()
    assert len(result["losses"]) == 30 and after < 0.5 * before, (before, after)  # 0.0024 -> 0.0005 here

    with torch.no_grad():
        student_logits = student(data[:2], positions)
    trained = {name: quantize.fake_quantize_weight(module.weight.detach(), "int4", 32)
               for name, module in student.named_modules() if isinstance(module, quantize.QATLinear)
               and module.kind == "int4"}
    output = tmp_path / "model_int4.g32.qat.pth"
    qat.write_quantized(student, quantization, output, activation_bits=8)
    written = torch.load(output, weights_only=True)
    assert written["quantization"]["activation_bits"] == 8
    for name, weight in trained.items():
        state = written["state_dict"]
        codes = quantize.unpack_int4(state[f"{name}.weight"])
        assert torch.equal(quantize.dequantize_int4(codes, state[f"{name}.scales"], state[f"{name}.zeros"], 32), weight)
    loaded = generate.load_model(output, "cpu", torch.float32)
    assert all(m.activation_bits == 8 for m in loaded.modules() if isinstance(m, quantize.Int4Linear))
    loaded.setup_caches(2, 32)
    with torch.no_grad():
        loaded_logits = loaded(data[:2], positions)
    assert (loaded_logits - student_logits).abs().max() < 0.03 * student_logits.abs().max()


def test_int8_grouped_checkpoint_gives_the_students_logits(tiny_models, tmp_path):
    """int8 g32 trained through the int8 KV cache's rounding: the written checkpoint, loaded (its prompt path
    computes in float32 on the dequantized weights, its KV cache int8 by default), gives the student's logits."""
    _, _, checkpoint = tiny_models["qwen2"]
    args = qat.parse_args(["--checkpoint_path", str(checkpoint), "--mode", "int8", "--groupsize", "32",
                           "--batch_size", "2", "--steps", "3", "--kv_bits", "8", "--lr", "1e-4"])
    teacher = generate.load_model(checkpoint, "cpu", torch.float32)
    data = quantize.self_generated_text(teacher, 4, 16, seed=0, greedy_tokens=qat.GREEDY_TOKENS, progress=False)
    quantization = quantize.plan(teacher, "int8", 32, 32)
    student = generate.load_model(checkpoint, "cpu", torch.float32)
    quantize.swap_for_qat(student, quantization)
    qat.prepare_for_training(teacher, 16, 4)
    qat.prepare_for_training(student, 16, 4, kv_bits=8)
    qat.train(student, teacher, data, args, tmp_path / "state", log=lambda line: None)
    with torch.no_grad():
        student_logits = student(data, torch.arange(16))
    output = tmp_path / "model_int8.g32.kv8.qat.pth"
    qat.write_quantized(student, quantization, output, kv_bits=8)

    loaded = generate.load_model(output, "cpu", torch.float32)
    assert loaded.kv_cache_dtype == torch.int8 and torch.load(output, weights_only=True)["quantization"]["kv_cache_bits"] == 8
    loaded.setup_caches(4, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(data, torch.arange(16)), student_logits, atol=1e-5)


def test_int4_per_channel_checkpoint_gives_the_students_logits(tiny_models, tmp_path):
    """--groupsize channel: one int4 group per output channel (scales [N, 1]); the written model_int4.qat.pth,
    loaded (the 96-input layers' prompts take the dequantized weights: ATen's kernels take groups of 32-256
    only), gives the student's logits."""
    _, _, checkpoint = tiny_models["llama"]
    args = qat.parse_args(["--checkpoint_path", str(checkpoint), "--mode", "int4", "--groupsize", "channel",
                           "--batch_size", "2", "--steps", "3", "--lr", "1e-4"])
    assert args.groupsize is None and qat.output_path(args) == checkpoint.with_name("model_int4.qat.pth")
    teacher = generate.load_model(checkpoint, "cpu", torch.float32)
    data = quantize.self_generated_text(teacher, 4, 16, seed=0, greedy_tokens=qat.GREEDY_TOKENS, progress=False)
    quantization = quantize.plan(teacher, "int4", None)
    student = generate.load_model(checkpoint, "cpu", torch.float32)
    quantize.swap_for_qat(student, quantization)
    for model in (teacher, student):
        qat.prepare_for_training(model, 16, 4)
    qat.train(student, teacher, data, args, tmp_path / "state", log=lambda line: None)
    with torch.no_grad():
        student_logits = student(data, torch.arange(16))
    output = tmp_path / "model_int4.qat.pth"
    qat.write_quantized(student, quantization, output)
    state = torch.load(output, weights_only=True)["state_dict"]
    assert state["layers.0.feed_forward.w2.scales"].shape == (64, 1)  # (its 96 inputs: no ATen group size)
    loaded = generate.load_model(output, "cpu", torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, quantize.Int4Linear)]
    assert layers and all(m.groupsize == m.in_features for m in layers)
    loaded.setup_caches(4, 16)
    with torch.no_grad():  # (the 64-input layers' one group is an ATen group size: bfloat16 activations there)
        assert (loaded(data, torch.arange(16)) - student_logits).abs().max() < 0.03 * student_logits.abs().max()


def test_the_script_names_and_records_its_run(tiny_models):
    _, _, checkpoint = tiny_models["qwen3"]
    output = qat.run(tiny_run(checkpoint, "--steps", 2, "--kv_bits", 8, "--overwrite"))
    assert output == checkpoint.with_name("model_int4.g32.kv8.qat.pth")
    record = torch.load(output, weights_only=True)["quantization"]
    assert record["mode"] == "int4" and record["groupsize"] == 32 and record["kv_cache_bits"] == 8
    assert record["qat"] == dict(data="self-generated", sequences=8, length=32, steps=2, batch_size=4,
                                 accumulation=1, lr=1e-4, seed=0)
    assert generate.load_model(output, "cpu", torch.float32).kv_cache_dtype == torch.int8


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_models, tmp_path, monkeypatch, capsys):
    _, _, checkpoint = tiny_models["mistral"]
    straight = qat.run(tiny_run(checkpoint, "--steps", 6, "--output", tmp_path / "straight.pth"))

    calls = {"steps": 0}
    original_step = torch.optim.AdamW.step

    def step_then_stop(self, *args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] == 5:
            raise KeyboardInterrupt  # during step 5, after the state of step 4 was saved
        return original_step(self, *args, **kwargs)

    resumed_path = tmp_path / "resumed.pth"
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        qat.run(tiny_run(checkpoint, "--steps", 6, "--save_every", 2, "--output", resumed_path))
    monkeypatch.undo()
    assert not resumed_path.exists() and (tmp_path / "resumed.pth.state").is_file()
    capsys.readouterr()
    qat.run(tiny_run(checkpoint, "--steps", 6, "--save_every", 2, "--output", resumed_path))
    assert "resuming from step 4 of 6" in capsys.readouterr().err
    assert not (tmp_path / "resumed.pth.state").exists()
    a, b = (torch.load(path, weights_only=True)["state_dict"] for path in (straight, resumed_path))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("model,flags,message", [
    ("tiny", ["--groupsize", "256"], "no layer of this model can take group size 256"),
    ("tiny", ["--groupsize", "48"], "invalid choice: 48 (choose from 32, 64, 128, 256, channel)"),
    ("tiny", ["--steps", "0"], "--steps must be at least 1"),
    ("tiny", ["--text_file", "{missing}"], "not found"),
    ("tiny", ["--output", "{existing}"], "exists; pass --overwrite"),
    ("real", ["--text_file", "{text}"], "fewer than --batch_size 4 sequences"),
    ("real", ["--length", "9000"], "longer than the model's context"),
])
def test_bad_input_is_one_error_line(model, flags, message, tiny_models, smollm2_checkpoint, tmp_path, capsys):
    """Each error before any training: one line, exit 2, no output file (the real model has the tokenizer that
    --text_file needs)."""
    checkpoint = smollm2_checkpoint if model == "real" else tiny_models["llama"][2]
    text, existing = tmp_path / "short.txt", tmp_path / "existing.pth"
    text.write_text("Too short to train on.")
    existing.write_bytes(b"keep me")
    flags = [flag.format(text=text, missing=tmp_path / "missing.txt", existing=existing) for flag in flags]
    output = [] if "--output" in flags else ["--output", str(tmp_path / "out.pth")]
    with pytest.raises(SystemExit) as exit_info:
        qat.main(["--checkpoint_path", str(checkpoint), "--mode", "int4", "--steps", "2", *output, *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out.pth").exists() and existing.read_bytes() == b"keep me"
    assert not list(tmp_path.glob("*.tmp"))
