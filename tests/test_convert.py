"""Converter: every HF weight layout gives the same checkpoint; GGUF matches transformers' own GGUF loader;
bad input is one line, exit code 2 and no model.pth."""
import errno
import json
import shutil

import pytest
import torch

import checkpoint as checkpoint_format
from convert_hf_checkpoint import convert, main, unpermute_rope_rows


def state_dict_of(path):
    return checkpoint_format.load(path).state_dict


def save_bin_layout(hf_model, folder, shards: int):
    """Old hub layout, which transformers 5 no longer writes: pytorch_model.bin, or shards with an index."""
    hf_model.config.save_pretrained(folder)
    state_dict = {k: v.clone() for k, v in hf_model.state_dict().items()}
    if shards == 1:
        torch.save(state_dict, folder / "pytorch_model.bin")
        return
    names, weight_map = list(state_dict), {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = names[shard::shards]
        torch.save({k: state_dict[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["sharded_safetensors", "single_bin", "sharded_bin"])
def test_weight_layouts_convert_identically(layout, tiny_models, tmp_path):
    hf_model, _, reference = tiny_models["qwen2"]
    if layout == "sharded_safetensors":
        hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    else:
        save_bin_layout(hf_model, tmp_path, shards=1 if layout == "single_bin" else 3)
    ours, expected = state_dict_of(convert(checkpoint_dir=tmp_path)), state_dict_of(reference)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_dtype_flag_and_tokenizer_files_copied(tiny_models, tmp_path):
    _, folder, _ = tiny_models["llama"]
    source = tmp_path / "src"
    shutil.copytree(folder, source, ignore=shutil.ignore_patterns("model.pth"))
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    out = convert(checkpoint_dir=source, dtype=torch.bfloat16)
    checkpoint = checkpoint_format.load(out)
    assert {t.dtype for t in checkpoint.state_dict.values()} == {torch.bfloat16}
    assert "output.weight" not in checkpoint.state_dict  # tied: stored once
    assert checkpoint.args.tie_word_embeddings is True


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_missing_folder(tmp_path, capsys):
    code, err = run_main(["--checkpoint_dir", tmp_path / "nope"], capsys)
    assert code == 2 and "checkpoint directory" in err and "not found" in err
    assert err.count("\n") == 1


def test_folder_without_config(tmp_path, capsys):
    code, err = run_main(["--checkpoint_dir", tmp_path], capsys)
    assert code == 2 and "config.json not found" in err
    assert not (tmp_path / "model.pth").exists()


def test_unsupported_model_type(tiny_models, tmp_path, capsys):
    _, folder, _ = tiny_models["llama"]
    shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("model.pth"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, err = run_main(["--checkpoint_dir", tmp_path / "m"], capsys)
    assert code == 2 and "model_type 'gpt2' is not supported" in err
    assert not (tmp_path / "m" / "model.pth").exists()


def test_missing_shard(tiny_models, tmp_path, capsys):
    hf_model, _, _ = tiny_models["llama"]
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, err = run_main(["--checkpoint_dir", tmp_path], capsys)
    assert code == 2 and shard.name in err
    assert not (tmp_path / "model.pth").exists()


def test_config_that_does_not_fit_the_weights(tiny_models, tmp_path, capsys):
    _, folder, _ = tiny_models["mistral"]
    shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("model.pth"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    code, err = run_main(["--checkpoint_dir", tmp_path / "m"], capsys)
    assert code == 2 and "feed_forward" in err and "config implies" in err
    assert not (tmp_path / "m" / "model.pth").exists()


def test_failed_write_leaves_no_checkpoint(tiny_models, tmp_path, monkeypatch):
    """An interruption while writing (here: the disk fills up) leaves neither model.pth nor the temporary file."""
    _, folder, _ = tiny_models["llama"]
    shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("model.pth"))

    def failing_save(obj, file):  # torch.save reports a failed write as a RuntimeError about zip positions
        file.write(b"partial")
        file.error = OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 640 vs 534")

    monkeypatch.setattr(checkpoint_format.torch, "save", failing_save)
    with pytest.raises(checkpoint_format.CheckpointError, match="could not write .*No space left on device"):
        convert(checkpoint_dir=tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").glob("model.pth*")) == []


def test_bad_gguf_file(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    code, err = run_main(["--gguf", bad, "--checkpoint_dir", tmp_path / "out"], capsys)
    assert code == 2 and "not a readable GGUF file" in err
    assert not (tmp_path / "out" / "model.pth").exists()
    code, err = run_main(["--gguf", tmp_path / "missing.gguf", "--checkpoint_dir", tmp_path / "out"], capsys)
    assert code == 2 and "not found" in err


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes q/k rows (HF rotate-half -> interleaved pairs); we must undo exactly that."""
    n_heads, head_dim = 3, 8
    weight = torch.randn(n_heads * head_dim, 5)
    # The permutation as llama.cpp's convert_hf_to_gguf.py applies it.
    permuted = weight.reshape(n_heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), weight)


@pytest.mark.slow
def test_gguf_logits_match_transformers_gguf_loader(smollm2_gguf, smollm2_checkpoint):
    from transformers import AutoModelForCausalLM

    from generate import load_model

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tokens = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, 48)
    with torch.no_grad():
        difference = (model(tokens, torch.arange(48)) - reference(tokens).logits).abs().max()
    assert difference < 1e-4


def test_keep_quantization_needs_gguf(tiny_models, capsys):
    _, folder, _ = tiny_models["llama"]
    code, err = run_main(["--checkpoint_dir", folder, "--keep_quantization"], capsys)
    assert code == 2 and "--keep_quantization applies to --gguf sources only" in err


def test_keep_quantization_of_a_gguf_with_nothing_to_keep(tmp_path, capsys):
    """A GGUF with no Q4_0/Q4_1/Q8_0 weight (here one F32 tensor) has nothing to keep: say so, write nothing."""
    import gguf
    import numpy as np

    path = tmp_path / "float.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, err = run_main(["--gguf", path, "--checkpoint_dir", tmp_path / "out", "--keep_quantization"], capsys)
    assert code == 2 and "has no Q4_0, Q4_1, Q4_K, Q5_0, Q8_0, Q6_K weights to keep; convert it without" in err
    assert not list((tmp_path / "out").glob("model*"))


class FakeTensor:
    """What the GGUF block readers use of a gguf.ReaderTensor: its bytes, shape (fastest dim first) and type."""

    def __init__(self, data, rows, columns, tensor_type):
        self.data, self.shape, self.tensor_type = data, [columns, rows], tensor_type


def random_blocks(type_name: str, rows: int, columns: int, seed: int = 0):
    """Random bytes laid out as `type_name` blocks: any bytes are a valid block once its float16 fields hold
    finite numbers, which we put there (d, and dmin for Q4_K)."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, columns // block, block_bytes), dtype=np.uint8)
    halves = {"Q4_K": [0, 2], "Q5_0": [0], "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q6_K": [208]}[type_name]
    for offset in halves:
        values = rng.uniform(-0.02, 0.02, size=(rows, columns // block)).astype(np.float16)
        data[..., offset:offset + 2] = values.view(np.uint8).reshape(rows, columns // block, 2)
    return FakeTensor(data.reshape(rows, -1), rows, columns, kind)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q4_1"])
def test_gguf_blocks_kept_dequantize_as_gguf_does(type_name):
    """Each kept type read into our parts (int4 g32 values, scales and zeros; int8 values and scales of group
    32, or 16 for Q6_K) dequantizes to what the gguf package's dequantize gives: exactly for the int8 kinds,
    within float32 rounding for int4 (our (q - 8) * scale + zero orders the operations differently)."""
    from gguf.quants import dequantize

    import convert_hf_checkpoint as converter
    from quantize import dequantize_int4, dequantize_int8

    kind, groupsize, read = converter.kept_gguf_types()[__import__("gguf").GGMLQuantizationType[type_name]]
    tensor = random_blocks(type_name, rows=16, columns=512)
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(16, 512).float()
    parts = read(tensor)
    if kind == "int4":
        q, scales, zeros = parts
        assert q.min() >= 0 and q.max() <= 15 and scales.shape == (16, 512 // 32)
        ours = dequantize_int4(q, scales, zeros, 32)
    else:
        q, scales = parts
        assert q.dtype == torch.int8 and scales.shape == (16, 512 // groupsize)
        ours = dequantize_int8(q, scales)
    if kind == "int8":  # d * q (Q6_K: (d * scale) * q) in float32, as gguf computes it: exact
        assert torch.equal(ours, expected)
    else:
        assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
