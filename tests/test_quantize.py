"""Quantization: kernels against the dequantized float weights, file round trips, GGUF Q4/Q8_0 import, errors."""
import sys
from pathlib import Path

import pytest
import torch

import cpu_ops
import quantize
import checkpoint as checkpoint_format
from convert_hf_checkpoint import convert
from generate import generate, load_model
from quantize import Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, main, quantize_checkpoint, unpack_int4


def close_to(y, reference, tolerance=1e-2):
    """Within `tolerance` of the output's scale: the CPU kernels take bfloat16 activations."""
    return (y.float() - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("bias,groupsize", [(False, None), (True, None), (True, 32)])
def test_int8_linear_matches_dequantized_reference(bias, groupsize):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=bias)
    module = Int8Linear.from_linear(linear, groupsize).to(torch.bfloat16)
    module.prepare_for_device(torch.bfloat16)
    dequantized = dequantize_int8(module.weight, module.scales)
    step = linear.weight.abs().reshape(96, -1, groupsize or 256).amax(-1, keepdim=True) / 127  # per channel or group
    assert ((dequantized - linear.weight).reshape(step.shape[0], step.shape[1], -1).abs() <= step).all()  # half, + margin
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), dequantized, linear.bias)
    assert close_to(module(x), reference)
    assert close_to(torch.compile(module)(x[:, :1]), reference[:, :1])  # the fused one-token path
    if groupsize:  # group scales survive .to(bfloat16): the weights are the float32 ones, rounded once
        assert module.scales.dtype == torch.float32 and module.scales.shape == (96, 256 // groupsize)
        assert torch.equal(module(x), torch.nn.functional.linear(x, dequantized.to(torch.bfloat16)) + module.bias)


@pytest.mark.parametrize("groupsize", [*quantize.GROUP_SIZES, None])
def test_int4_linear_matches_dequantized_reference(groupsize):
    """Every group size, and None: one group per output channel (scales [N, 1], which ATen's kernels cannot take:
    prompts dequantize, decoded rows take the native kernel where it builds)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 64, bias=True)
    module = Int4Linear.from_linear(linear, groupsize)
    assert module.scales.shape == (64, 512 // (groupsize or 512))
    dequantized = dequantize_int4(unpack_int4(module.weight), module.scales, module.zeros, groupsize)
    steps = module.scales.repeat_interleave(groupsize or 512, dim=1)
    assert ((dequantized - linear.weight).abs() <= steps / 2 + 1e-6).all()  # each weight within half a step
    module.prepare_for_device(torch.bfloat16, cpu_ops.KernelChoices(path=None))
    x = torch.randn(2, 7, 512, dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), dequantized, linear.bias)
    assert close_to(module(x), reference)
    for rows in (1, 4, 64):  # each number of rows by every path this layer holds
        for path in module.path_names(rows):
            y = module.run_path(path, x.reshape(-1, 512)[:rows]) + module.bias
            assert close_to(y, reference.reshape(-1, 64)[:rows]), path
    if groupsize is None:
        assert "aten" not in module.path_names(64) and "dequant" in module.path_names(64)


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(quantize.pack_int4(q)), q)


@pytest.mark.parametrize("mode,int8_groupsize,name", [("int8", None, "model_int8.pth"), ("int8", 32, "model_int8.g32.pth"),
                                                     ("int4", None, "model_int4.g32.pth")])
def test_quantize_save_load_generate(mode, int8_groupsize, name, tiny_models):
    """quantize -> file -> load (mode read from the file) -> logits near the float model's and text comes out."""
    _, _, checkpoint = tiny_models["qwen2"]
    output = quantize_checkpoint(checkpoint, mode, 32, int8_groupsize=int8_groupsize)
    assert output.name == name
    record = checkpoint_format.load(output).quantization
    assert record["mode"] == mode and record["int8_groupsize"] == int8_groupsize
    float_model, quantized = load_model(checkpoint, "cpu", torch.float32), load_model(output, "cpu", torch.float32)
    assert any(isinstance(m, Int8Linear if mode == "int8" else Int4Linear) for m in quantized.modules())
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    for model in (float_model, quantized):
        model.setup_caches(1, 20)
    with torch.no_grad():
        reference, ours = float_model(tokens, torch.arange(20)), quantized(tokens, torch.arange(20))
    assert close_to(ours, reference, 0.05 if mode == "int8" else 0.25)
    assert generate(quantized, torch.arange(5), 8).shape == (1, 13)


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_grouped_int8_from_the_command_line(tiny_models, capsys):
    """--mode int8 --groupsize 64: layers whose inputs (MLP down, 96) are not a multiple stay float, and say so."""
    _, _, checkpoint = tiny_models["qwen3"]
    main(["--checkpoint_path", str(checkpoint), "--mode", "int8", "--groupsize", "64"])
    assert "group size 64" in capsys.readouterr().out
    output = checkpoint.parent / "model_int8.g64.pth"
    record = checkpoint_format.load(output).quantization
    assert record["int8_groupsize"] == 64 and record["layers"]["layers.0.feed_forward.w2"] == "float"
    model = load_model(output, "cpu", torch.float32)
    assert model.layers[0].feed_forward.w1.scales.shape == (96, 1)
    assert generate(model, torch.arange(4), 4).shape == (1, 8)


@pytest.mark.parametrize("mode", ["int4", "int4-gptq"])
def test_int4_per_channel_from_the_command_line(mode, tiny_models, capsys):
    """--groupsize channel: one int4 scale and zero per output channel (model_int4.pth; the record's group size
    None); every layer dequantizes to round-to-nearest's weights (GPTQ: to its own codes on that one range per
    row); the model decodes, also through the native kernel's one group per row."""
    _, _, checkpoint = tiny_models["qwen2"]
    main(["--checkpoint_path", str(checkpoint), "--mode", mode, "--groupsize", "channel", "--calibration_samples", "2",
          "--calibration_length", "16"])
    assert "per output channel" in capsys.readouterr().out
    output = checkpoint.parent / f"model_{mode}.pth"
    record = checkpoint_format.load(output).quantization
    assert record["groupsize"] is None and all(kind in ("int4", "int8") for kind in record["layers"].values())
    float_model = load_model(checkpoint, "cpu", torch.float32)
    state = checkpoint_format.load(output).state_dict
    weight = float_model.layers[0].attention.wqkv.weight.detach()
    codes, scales, zeros = (state[f"layers.0.attention.wqkv.{name}"] for name in ("weight", "scales", "zeros"))
    assert scales.shape == (weight.shape[0], 1)
    if mode == "int4":
        assert torch.equal(dequantize_int4(unpack_int4(codes), scales, zeros), quantize.fake_quantize_weight(weight, "int4"))
    model = load_model(output, "cpu", torch.bfloat16)
    assert generate(model, torch.arange(5), 8).shape == (1, 13)


def test_int4_output_projection_from_the_command_line(tiny_models, capsys):
    """--output_projection int4: the output is an Int4Linear like the other layers (llama.cpp's Q4_0 layout of
    bytes), its file named apart from the int8-output one; refused in int8 mode, with nothing written."""
    _, _, checkpoint = tiny_models["llama"]
    main(["--checkpoint_path", str(checkpoint), "--mode", "int4", "--output_projection", "int4"])
    assert "output projection int4" in capsys.readouterr().out
    output = checkpoint.parent / "model_int4.g32.output_int4.pth"
    assert checkpoint_format.load(output).quantization["layers"]["output"] == "int4"
    float_model, quantized = load_model(checkpoint, "cpu", torch.float32), load_model(output, "cpu", torch.float32)
    assert type(quantized.output) is Int4Linear
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    for model in (float_model, quantized):
        model.setup_caches(1, 12)
    with torch.no_grad():
        assert close_to(quantized(tokens, torch.arange(12)), float_model(tokens, torch.arange(12)), 0.25)
    code, err = run_main(["--checkpoint_path", checkpoint, "--mode", "int8", "--output_projection", "int4"], capsys)
    assert code == 2 and "--output_projection int4 needs an int4 --mode" in err
    assert not (checkpoint.parent / "model_int8.output_int4.pth").exists()


def test_group_size_the_model_cannot_take(tiny_models, capsys):
    _, _, checkpoint = tiny_models["mistral"]  # hidden 64: no linear has in_features divisible by 128
    code, err = run_main(["--checkpoint_path", checkpoint, "--mode", "int4", "--groupsize", "128"], capsys)
    assert code == 2 and "group size 128" in err
    assert not (checkpoint.parent / "model_int4.g128.pth").exists()


def test_already_quantized_and_missing_and_unknown_mode(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    quantized = quantize_checkpoint(checkpoint, "int8", 32)
    code, err = run_main(["--checkpoint_path", quantized, "--mode", "int4"], capsys)
    assert code == 2 and "already quantized" in err
    assert not (checkpoint.parent / "model_int8_int4.g32.pth").exists()
    code, err = run_main(["--checkpoint_path", tmp_path / "none.pth", "--mode", "int8"], capsys)
    assert code == 2 and "not found" in err
    code, err = run_main(["--checkpoint_path", checkpoint, "--mode", "int3"], capsys)
    assert code == 2 and "invalid choice: 'int3'" in err
    code, err = run_main(["--checkpoint_path", checkpoint, "--mode", "int4", "--groupsize", "48"], capsys)
    assert code == 2 and "invalid choice: 48" in err


def test_layers_a_kernel_cannot_take_stay_float(tiny_models, capsys):
    """Group size 64 fits in_features 64 but not the MLP's 96: those layers stay float and the summary says so."""
    _, _, checkpoint = tiny_models["qwen3"]
    output = quantize_checkpoint(checkpoint, "int4", 64)
    plan = checkpoint_format.load(output).quantization
    assert plan["layers"]["layers.0.feed_forward.w2"] == "float" and "not a multiple of group size 64" in plan["skipped"]["layers.0.feed_forward.w2"]
    assert plan["layers"]["layers.0.feed_forward.w1"] == "int4"
    assert "left in float: layers.0.feed_forward.w2" in capsys.readouterr().out
    model = load_model(output, "cpu", torch.float32)
    assert type(model.layers[0].feed_forward.w2) is torch.nn.Linear


@pytest.mark.slow
def test_gguf_q4_1_imported_without_float_round_trip(smollm2_gguf, smollm2_checkpoint, tmp_path):
    """Q4_1 blocks become our int4 g32 exactly: dequantized, they are the float conversion's weights."""
    kept = convert(gguf=smollm2_gguf, checkpoint_dir=tmp_path, keep_quantization=True)
    checkpoint, reference = checkpoint_format.load(kept), checkpoint_format.load(smollm2_checkpoint).state_dict
    layers = checkpoint.quantization["layers"]
    # per layer: wqkv (fused from Q4_1 q, k, v), wo, w1, w3, w2; and the output from the tied Q8_0 embedding
    assert len(layers) == 30 * 5 + 1 and layers.pop("output") == "int8"
    sd = checkpoint.state_dict
    for prefix in layers:
        weight = dequantize_int4(unpack_int4(sd[f"{prefix}.weight"]), sd[f"{prefix}.scales"], sd[f"{prefix}.zeros"], 32)
        assert torch.equal(weight, reference[f"{prefix}.weight"]), prefix
    assert torch.equal(dequantize_int8(sd["output.weight"], sd["output.scales"]), reference["tok_embeddings.weight"])
    model, float_model = load_model(kept, "cpu", torch.bfloat16), load_model(smollm2_checkpoint, "cpu", torch.bfloat16)
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    for m in (model, float_model):
        m.setup_caches(1, 16)
    with torch.no_grad():
        assert close_to(model(tokens, torch.arange(16)), float_model(tokens, torch.arange(16)).float(), 0.03)


@pytest.mark.slow
def test_gguf_q8_0_imported_without_float_round_trip(smollm2_gguf, tmp_path):
    """Q8_0 blocks become our int8 g32 exactly: the model computes the float conversion's logits, bit for bit."""
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench import write_gguf

    q8_0 = write_gguf(smollm2_gguf, tmp_path / "SmolLM2.Q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    kept = convert(gguf=q8_0, checkpoint_dir=tmp_path / "kept", keep_quantization=True)
    float_checkpoint = convert(gguf=q8_0, checkpoint_dir=tmp_path / "float", dtype=torch.float32)
    assert kept.name == "model_int8.g32.pth"
    checkpoint, reference = checkpoint_format.load(kept), checkpoint_format.load(float_checkpoint).state_dict
    record = checkpoint.quantization
    assert record["mode"] == "int8" and record["int8_groupsize"] == 32
    assert set(record["layers"].values()) == {"int8"} and len(record["layers"]) == 30 * 5 + 1  # + the tied output
    sd = checkpoint.state_dict
    assert sd["output.scales"].shape == (49152, 576 // 32)
    for prefix in record["layers"]:
        source = reference["tok_embeddings.weight" if prefix == "output" else f"{prefix}.weight"]
        assert torch.equal(dequantize_int8(sd[f"{prefix}.weight"], sd[f"{prefix}.scales"]), source), prefix
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    models = [load_model(path, "cpu", torch.bfloat16) for path in (kept, float_checkpoint)]
    for m in models:
        m.setup_caches(1, 16)
    with torch.no_grad():
        assert torch.equal(*(m(tokens, torch.arange(16)) for m in models))


def mixed_k_quant_gguf(source: Path, dest: Path) -> Path:
    """SmolLM2's GGUF laid out as llama.cpp lays out a Q4_K_M file of a model whose width (576) is not a multiple
    of 256: the 576-input tensors Q5_0, the embedding Q8_0, ffn_down (1536 inputs) Q4_K in even layers and Q6_K
    in odd ones (random valid blocks: gguf cannot encode K-quants), and one Q5_1 tensor, which no format of ours
    holds exactly."""
    import gguf
    from gguf.quants import quantize

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench import write_gguf
    from test_convert import random_blocks

    types = gguf.GGMLQuantizationType

    def encode(name, weights):
        if "ffn_down" in name:
            layer = int(name.split(".")[1])
            fake = random_blocks("Q4_K" if layer % 2 == 0 else "Q6_K", *weights.shape, seed=layer)
            return fake.data, fake.tensor_type
        kind = {"token_embd.weight": types.Q8_0, "blk.0.ffn_up.weight": types.Q5_1}.get(name, types.Q5_0)
        return quantize(weights, kind), kind

    return write_gguf(source, dest, types.Q4_K, encode)


@pytest.mark.slow
def test_gguf_k_quants_kept_quantized(smollm2_gguf, tmp_path, capsys):
    """Q4_K becomes int4 g32, Q5_0 and Q8_0 int8 g32, Q6_K int8 g16 (a group size of the layer's own), each
    dequantizing to the float conversion's weights; the Q5_1 tensor is dequantized with a note. The model runs,
    and its logits follow the float conversion's."""
    path = mixed_k_quant_gguf(smollm2_gguf, tmp_path / "SmolLM2.mixed.gguf")
    capsys.readouterr()
    kept = convert(gguf=path, checkpoint_dir=tmp_path / "kept", keep_quantization=True)
    assert "note: 1 Q5_1 tensor dequantized to float" in capsys.readouterr().out
    float_checkpoint = convert(gguf=path, checkpoint_dir=tmp_path / "float", dtype=torch.float32)
    checkpoint, reference = checkpoint_format.load(kept), checkpoint_format.load(float_checkpoint).state_dict
    record, sd = checkpoint.quantization, checkpoint.state_dict
    layers = record["layers"]
    assert kept.name == "model_int4.g32.pth" and record["mode"] == "int4"
    assert [layers[f"layers.{i}.feed_forward.w2"] for i in range(4)] == ["int4", "int8", "int4", "int8"]
    assert record["layer_groupsizes"] == {f"layers.{i}.feed_forward.w2": 16 for i in range(1, 30, 2)}
    assert "layers.0.feed_forward.w3" not in layers and layers["layers.1.feed_forward.w3"] == "int8"
    assert layers["layers.0.attention.wqkv"] == "int8" and layers["output"] == "int8"
    assert sd["layers.1.feed_forward.w2.scales"].shape == (576, 1536 // 16)
    for prefix, kind in layers.items():
        source = reference["tok_embeddings.weight" if prefix == "output" else f"{prefix}.weight"]
        if kind == "int8":
            assert torch.equal(dequantize_int8(sd[f"{prefix}.weight"], sd[f"{prefix}.scales"]), source), prefix
        else:
            weight = dequantize_int4(unpack_int4(sd[f"{prefix}.weight"]), sd[f"{prefix}.scales"],
                                     sd[f"{prefix}.zeros"], 32)
            assert torch.allclose(weight, source, rtol=1e-6, atol=1e-6), prefix
    assert sd["layers.0.feed_forward.w3.weight"].dtype == torch.bfloat16  # dequantized, stored as bfloat16
    model, float_model = load_model(kept, "cpu", torch.float32), load_model(float_checkpoint, "cpu", torch.float32)
    assert isinstance(model.layers[1].feed_forward.w2, Int8Linear) and model.layers[1].feed_forward.w2.groupsize == 16
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    for m in (model, float_model):
        m.setup_caches(1, 16)
    with torch.no_grad():
        # Every layer's weights are pinned exactly above; what is left is the kernels' activation rounding
        # (bfloat16 into ATen's int4 prefill kernel, int8 into the native ones) through 30 layers: 0.030 of
        # the logits' scale on an AVX-512 Xeon, less on Zen 3. This checks that the kept layers' kernels run.
        assert close_to(model(tokens, torch.arange(16)), float_model(tokens, torch.arange(16)), 0.05)
    assert generate(model, tokens[0, :8], 4).shape == (1, 12)  # decoding: the g16 layers' own paths


@pytest.mark.slow
def test_int8_smollm2_answers_paris(smollm2_checkpoint):
    from tokenizer import Tokenizer

    output = quantize_checkpoint(smollm2_checkpoint, "int8", 32)
    tokenizer = Tokenizer(output.parent)
    model = load_model(output, "cpu", torch.bfloat16)
    prompt = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    tokens = generate(model, prompt, 20, stop_ids=tokenizer.eos_ids)[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(tokens)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """Uncorrelated inputs give GPTQ nothing to compensate: its codes must be plain rounding's."""
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    q, scales, zeros = quantize.gptq_quantize(weight, torch.eye(128), groupsize=32, blocksize=64, damping=0.0)
    reference = quantize.quantize_int4(weight, 32)
    assert torch.equal(q, reference[0])
    assert torch.allclose(scales, reference[1]) and torch.allclose(zeros, reference[2])


def test_gptq_per_channel_with_identity_hessian_is_round_to_nearest():
    """One group per row, wider than GPTQ's block of columns: its range is the whole row's (not the first block's)."""
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    q, scales, zeros = quantize.gptq_quantize(weight, torch.eye(256), groupsize=None, blocksize=64, damping=0.0)
    reference = quantize.quantize_int4(weight)
    assert scales.shape == (16, 1) and torch.equal(q, reference[0])
    assert torch.allclose(scales, reference[1]) and torch.allclose(zeros, reference[2])


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(64, 64)
    x = torch.randn(2048, 64) @ mixing  # strongly correlated input features
    weight = torch.randn(32, 64)
    hessian = 2 * x.T @ x / len(x)
    gptq = dequantize_int4(*quantize.gptq_quantize(weight, hessian, groupsize=32, blocksize=32), 32)
    rtn = dequantize_int4(*quantize.quantize_int4(weight, 32), 32)
    error = lambda w: ((x @ w.T - x @ weight.T) ** 2).mean()  # noqa: E731
    assert error(gptq) < 0.7 * error(rtn)


def test_gptq_missing_calibration_file(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    code, err = run_main(["--checkpoint_path", checkpoint, "--mode", "int4-gptq", "--calibration_file",
                          tmp_path / "none.txt"], capsys)
    assert code == 2 and "calibration file" in err and "not found" in err
    assert not (checkpoint.parent / "model_int4-gptq.g32.pth").exists()


def test_gptq_self_calibrated_round_trip(tiny_models):
    """With no calibration file the model writes its own calibration text; the file loads and generates."""
    _, _, checkpoint = tiny_models["qwen3"]
    output = quantize_checkpoint(checkpoint, "int4-gptq", 32, calibration_samples=2, calibration_length=16)
    record = checkpoint_format.load(output).quantization
    assert output.name == "model_int4-gptq.g32.pth" and record["calibration"] == "self-generated"
    assert record["calibration_tokens"] == 32
    assert generate(load_model(output, "cpu", torch.float32), torch.arange(4), 6).shape == (1, 10)


def test_memory_report_shows_the_smaller_model(tiny_models):
    from memory import memory_report

    _, _, checkpoint = tiny_models["mistral"]
    reports = {}
    for name, path in [("float", checkpoint), ("int8", quantize_checkpoint(checkpoint, "int8", 32))]:
        model = load_model(path, "cpu", torch.bfloat16)
        model.setup_caches(1, 64)
        reports[name] = memory_report(model, "cpu").splitlines()[-1].split("|")
    assert reports["float"][1] == reports["int8"][1]  # the same parameter count
    assert float(reports["int8"][2].split()[0]) < float(reports["float"][2].split()[0])
    kv = 2 * 2 * 2 * 64 * 16 * 2 / 1e6  # layers x (k, v) x kv heads x length x head_dim x bytes
    assert reports["float"][3].strip() == f"{kv:.2f} MB"


@pytest.mark.slow
def test_gptq_perplexity_better_than_plain_int4(smollm2_checkpoint):
    """On held-out real text (GPL-3), GPTQ calibrated on another text (Apache-2.0) beats rounding at group 64."""
    import eval as evaluate

    plain = quantize_checkpoint(smollm2_checkpoint, "int4", 64)
    gptq = quantize_checkpoint(smollm2_checkpoint, "int4-gptq", 64, calibration_file="/usr/share/common-licenses/Apache-2.0",
                               calibration_samples=8, calibration_length=256)
    tokens = torch.tensor(evaluate.Tokenizer(smollm2_checkpoint.parent).encode(
        open("/usr/share/common-licenses/GPL-3").read())[:2048])
    results = {name: evaluate.perplexity(load_model(path, "cpu", torch.float32), tokens, 512, 256)[0]
               for name, path in [("plain", plain), ("gptq", gptq)]}
    assert results["gptq"] < results["plain"], results
