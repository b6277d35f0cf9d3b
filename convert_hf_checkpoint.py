"""Convert a HF checkpoint (local folder or hub id) or a GGUF file into our `model.pth`.

    python convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B   # writes DIR/model.pth
    python convert_hf_checkpoint.py --repo_id Qwen/Qwen2.5-0.5B-Instruct                   # downloads, then converts
    python convert_hf_checkpoint.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --checkpoint_dir checkpoints/SmolLM2-135M-Instruct

The model's shape always comes from the checkpoint's own config (config.json, or the GGUF metadata).
`model.pth` holds {"model_args": ..., "quantization": ..., "state_dict": ...} so that every file,
quantized ones too, describes itself; tokenizer files are written next to it.
"""
import json
import re
import sys
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import cli
from checkpoint import atomic_output
from cli import ArgumentParser, UsageError
from medusa import write_medusa_heads
from model import ModelArgs, Transformer
from quantize import dequantize_int4, dequantize_int8, pack_int4

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(UsageError):
    """A source that cannot be converted: one line, exit code 2."""


# HF parameter names -> ours. q/k/v are fused into wqkv afterwards.
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}

GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}


def rename(name: str, top_names: dict, layer_pattern: str, layer_names: dict) -> str:
    if name in top_names:
        return top_names[name]
    match = re.fullmatch(layer_pattern, name)
    if match and match.group(2) in layer_names:
        return f"layers.{match.group(1)}.{layer_names[match.group(2)]}.{match.group(3)}"
    raise ConversionError(f"weight {name!r} is not part of a supported Llama/Mistral/Qwen model; cannot convert it")


def fuse_qkv(state_dict: dict, args: ModelArgs) -> dict:
    """Concatenate each layer's q, k, v (weights and biases) into one wqkv, as the model reads them."""
    for i in range(args.n_layer):
        for kind in ("weight", "bias"):
            parts = [f"layers.{i}.attention.{w}.{kind}" for w in ("wq", "wk", "wv")]
            if all(p in state_dict for p in parts):
                state_dict[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([state_dict.pop(p) for p in parts])
            elif any(p in state_dict for p in parts):
                raise ConversionError(f"layer {i} has only some of q/k/v {kind}s; the checkpoint is incomplete")
    if args.tie_word_embeddings:
        state_dict.pop("output.weight", None)
    return state_dict


def check_complete(state_dict: dict, args: ModelArgs, source):
    """Every parameter the model declares must be present with the shape the config implies."""
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    checkpoint.check_tensors(state_dict, expected, source)


def cast(state_dict: dict, dtype):
    # Norm weights and everything else go to one dtype: the model runs in one dtype.
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state_dict.items()}


# ---------------------------------------------------------------- HF folders


def hf_weight_files(directory: Path) -> list:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ConversionError(f"{index} names shard {missing[0]!r}, which is not in {directory}; download it")
            return [directory / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise ConversionError(f"no model.safetensors, pytorch_model.bin or shard index in {directory}")


def read_weight_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def convert_hf_folder(directory: Path, output: Path, dtype=None) -> tuple:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} not found; --checkpoint_dir must be a HF model folder with its config.json")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if config.get("mlp_bias"):
        raise ConversionError("MLP biases (mlp_bias=true) are not supported")
    args = ModelArgs.from_hf_config(config)
    state_dict, medusa_heads = {}, {}
    files = hf_weight_files(directory)
    with tqdm(total=len(files), desc="reading shards", unit="file", disable=len(files) < 2) as bar:
        for file in files:
            for name, tensor in read_weight_file(file).items():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a cached rope buffer some old checkpoints carry; we recompute it
                if name.startswith("medusa_head."):  # a "medusa-1.0" model bundles its heads: split them out
                    medusa_heads[name.removeprefix("medusa_head.")] = tensor
                    continue
                state_dict[rename(name, HF_TOP_NAMES, r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", HF_LAYER_NAMES)] = tensor
            bar.update()
    state_dict = cast(fuse_qkv(state_dict, args), dtype)
    check_complete(state_dict, args, directory)
    if medusa_heads:
        num_layers = config.get("medusa_num_layers") or max(int(name.split(".")[1]) for name in medusa_heads)
        num_heads = config.get("medusa_num_heads") or 1 + max(int(name.split(".")[0]) for name in medusa_heads)
        heads_dir = output.parent / "medusa"
        write_medusa_heads(medusa_heads, num_heads, num_layers, heads_dir, str(directory))
        print(f"Medusa: {num_heads} bundled heads -> {heads_dir} (use --medusa_checkpoint_path {heads_dir})")
    if directory.resolve() != output.parent.resolve():
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                with atomic_output(output.parent / name) as tmp:
                    shutil.copy(directory / name, tmp)
    return args, state_dict


def download(repo_id: str, checkpoints: Path) -> Path:
    """Download a hub model's config, tokenizer and weights (safetensors when it has them) into checkpoints/ORG/NAME."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id)
    weights = ["*.safetensors", "model.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) else [
        "*.bin", "pytorch_model.bin.index.json"]
    target = checkpoints / repo_id
    snapshot_download(repo_id, local_dir=target, allow_patterns=["config.json", *TOKENIZER_FILES, *weights])
    return target


# ---------------------------------------------------------------- GGUF


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_args(reader) -> ModelArgs:
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    names = {t.name for t in reader.tensors}

    def get(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    n_head = get("attention.head_count")
    dim = get("embedding_length")
    rope_scaling = None
    if get("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    tokens = gguf_field(reader, "tokenizer.ggml.tokens") or []
    window = get("attention.sliding_window")
    return ModelArgs(
        vocab_size=get("vocab_size") or len(tokens),
        dim=dim,
        n_layer=get("block_count"),
        n_head=n_head,
        n_local_heads=get("attention.head_count_kv") or n_head,
        head_dim=get("attention.key_length") or dim // n_head,
        intermediate_size=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=window or None,
    )


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rope pairs (Meta layout); put them back in HF's rotate-half order."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensor(tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        data = tensor.data
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            return torch.from_numpy(data.copy()).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(data.copy()).reshape(shape)
    return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(shape)


def gguf_blocks(tensor, block_bytes: int) -> torch.Tensor:
    """The tensor's bytes as [rows, blocks per row, block_bytes] (uint8)."""
    rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
    return torch.from_numpy(tensor.data.copy()).reshape(rows, -1, block_bytes)


def fp16(pair: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes of little-endian float16 -> [...] float32."""
    return pair.contiguous().view(torch.float16).float().squeeze(-1)


def gguf_int4_parts(tensor):
    """A Q4_0 / Q4_1 tensor as our int4 g32 parts (values 0..15, scales, zeros), read from its blocks directly.

    Block layout (ggml): fp16 d, [fp16 m,] 16 bytes whose low nibbles are elements 0-15 and high nibbles
    16-31. Q4_1 is d * q + m and Q4_0 is d * (q - 8); in our (q - 8) * scale + zero form scale = d and
    zero = m + 8 d (Q4_1) or 0 (Q4_0).
    """
    from gguf import GGMLQuantizationType

    rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
    has_min = tensor.tensor_type == GGMLQuantizationType.Q4_1
    blocks = torch.from_numpy(tensor.data.copy()).reshape(rows, -1, 20 if has_min else 18)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    nibbles = blocks[..., 4:] if has_min else blocks[..., 2:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(rows, -1)
    zeros = d * 8 + blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) if has_min else torch.zeros_like(d)
    return q, d, zeros


def gguf_int8_parts(tensor):
    """A Q8_0 tensor as our int8 g32 parts (values, scales [rows, K/32]): each block is fp16 d and 32 int8
    values, w = d * q, which is our grouped symmetric int8 with scale = d."""
    rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
    blocks = torch.from_numpy(tensor.data.copy()).reshape(rows, -1, 34)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    return blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d


def gguf_q4_k_parts(tensor):
    """A Q4_K tensor as our int4 g32 parts. A super-block of 256 weights is fp16 d, fp16 dmin, 12 bytes holding
    eight 6-bit scales sc and mins m (one pair per sub-block of 32), and 128 bytes of 4-bit values: each 32
    bytes hold sub-block 2j in their low nibbles and 2j + 1 in their high ones. w = d sc_j q - dmin m_j, so in our
    (q - 8) * scale + zero form scale = d sc_j and zero = 8 scale - dmin m_j."""
    blocks = gguf_blocks(tensor, 144)
    rows, n = blocks.shape[:2]
    d, dmin = fp16(blocks[..., 0:2]), fp16(blocks[..., 2:4])
    sc, m = k_quant_scales_and_mins(blocks[..., 4:16])
    qs = blocks[..., 16:].reshape(rows, n, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=3).reshape(rows, n * 256)
    scales = (d[..., None] * sc).reshape(rows, n * 8)
    zeros = 8 * scales - (dmin[..., None] * m).reshape(rows, n * 8)
    return q, scales, zeros


def k_quant_scales_and_mins(packed: torch.Tensor) -> tuple:
    """Q4_K's 12 bytes -> 8 scales and 8 mins (float): bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 mins
    0-3; the top 2 bits of bytes 0-3 (4-7) are the high bits of scales (mins) 4-7, whose low 4 bits are the low
    (high) nibbles of bytes 8-11."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def gguf_q5_0_parts(tensor):
    """A Q5_0 tensor as our int8 g32 parts: a block is fp16 d, 4 bytes whose bit i is element i's fifth bit, and
    16 bytes whose low nibbles are elements 0-15 and high nibbles 16-31; w = d (q - 16), q in 0..31: int8 values
    q - 16 with scale d."""
    blocks = gguf_blocks(tensor, 22)
    rows = blocks.shape[0]
    d = fp16(blocks[..., 0:2])
    fifth = (blocks[..., 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [rows, n, 4 bytes, 8 bits]
    nibbles = blocks[..., 6:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1) | (fifth.reshape(*fifth.shape[:2], 32) << 4)
    return (q.to(torch.int8) - 16).reshape(rows, -1), d


def gguf_q6_k_parts(tensor):
    """A Q6_K tensor as our int8 g16 parts: a super-block of 256 weights is 128 bytes of low 4 bits, 64 bytes of
    high 2 bits, 16 int8 scales (one per 16 weights) and fp16 d. Each half of 128 weights takes 64 low-bit bytes
    (their low nibbles are weights 0-63 of the half, high nibbles 64-127) and 32 high-bit bytes (bits 2t..2t+1
    of byte b belong to weight 32t + b). w = d scale_j (q - 32), q in 0..63: int8 values q - 32, scale d scale_j."""
    blocks = gguf_blocks(tensor, 210)
    rows, n = blocks.shape[:2]
    low = blocks[..., 0:128].reshape(rows, n, 2, 1, 64)
    low = torch.cat([low & 0xF, low >> 4], dim=3).reshape(rows, n, 256)
    high = blocks[..., 128:192].reshape(rows, n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    high = (high & 3).reshape(rows, n, 256)
    q = (low | (high << 4)).to(torch.int8) - 32
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float() * fp16(blocks[..., 208:210])[..., None]
    return q.reshape(rows, -1), scales.reshape(rows, n * 16)


def kept_gguf_types() -> dict:
    """GGUF type -> (our kind, its group size, reader of its parts): the types our formats hold exactly."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: ("int4", 32, gguf_int4_parts), T.Q4_1: ("int4", 32, gguf_int4_parts),
            T.Q4_K: ("int4", 32, gguf_q4_k_parts), T.Q5_0: ("int8", 32, gguf_q5_0_parts),
            T.Q8_0: ("int8", 32, gguf_int8_parts), T.Q6_K: ("int8", 16, gguf_q6_k_parts)}


def convert_gguf(path: Path, output_dir: Path, dtype=None, keep_quantization: bool = False) -> tuple:
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading GGUF needs the gguf package: pip install gguf")
    if not path.is_file():
        raise ConversionError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the gguf package raises assorted errors on a bad file
        raise ConversionError(f"{path} is not a readable GGUF file ({error})")
    kept_types = kept_gguf_types()
    if keep_quantization and not any(t.tensor_type in kept_types for t in reader.tensors):
        names = ", ".join(t.name for t in kept_types)
        raise ConversionError(f"{path} has no {names} weights to keep; convert it without --keep_quantization")
    args = gguf_model_args(reader)
    arch = gguf_field(reader, "general.architecture")
    state_dict, kept, dequantized = {}, {}, {}
    for tensor in tqdm(reader.tensors, desc="reading GGUF", unit="tensor"):
        name = rename(tensor.name, GGUF_TOP_NAMES, r"blk\.(\d+)\.(\w+)\.(weight|bias)", GGUF_LAYER_NAMES)
        kind, groupsize, read_parts = kept_types.get(tensor.tensor_type, (None, None, None)) if keep_quantization \
            else (None, None, None)
        if kind == "int4" and int(tensor.shape[1]) % 8:
            kind = None  # the int4 kernels need out_features to be a multiple of 8
        if keep_quantization and not kind and tensor.tensor_type.name not in ("F32", "F16", "BF16") \
                and name != "tok_embeddings.weight":
            dequantized[tensor.tensor_type.name] = dequantized.get(tensor.tensor_type.name, 0) + 1
        if name == "tok_embeddings.weight":
            state_dict[name] = gguf_tensor(tensor).float()  # the lookup table stays float
            if not (kind and args.tie_word_embeddings):
                continue
            name = "output.weight"  # a tied output projection keeps the table's blocks as its own copy
        parts = read_parts(tensor) if kind else (gguf_tensor(tensor).float(),)
        heads = {"wq": args.n_head, "wk": args.n_local_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads:  # q/k rows (and their scales and zeros) back to HF's order
            parts = tuple(unpermute_rope_rows(part, heads) for part in parts)
        if kind:
            kept[name] = (kind, groupsize, parts)
        else:
            state_dict[name] = parts[0]
    for type_name, count in sorted(dequantized.items()):
        print(f"note: {count} {type_name} tensor{'s' if count > 1 else ''} dequantized to float (our formats hold "
              f"{', '.join(t.name for t in kept_types)} exactly, not {type_name})")
    fuse_kept_qkv(kept, state_dict, args)
    # Float tensors: as asked, else bfloat16 (a 7B Q4_K_M import would be 28 GB in float32).
    state_dict = cast(fuse_qkv(state_dict, args), dtype or torch.bfloat16)
    if keep_quantization:  # the quantized tensors are not cast: their scales are the GGUF's fp16 values, exactly
        quantization = kept_state_dict(kept, state_dict)
    else:
        check_complete(state_dict, args, path)
        quantization = None
    write_gguf_tokenizer(path, reader, output_dir)
    return args, state_dict, quantization


def dequantize_kept(kind: str, groupsize: int, parts: tuple) -> torch.Tensor:
    return dequantize_int4(*parts, groupsize) if kind == "int4" else dequantize_int8(*parts)


def fuse_kept_qkv(kept: dict, state_dict: dict, args: ModelArgs):
    """Fuse each layer's kept q, k, v into one wqkv when all three are of one kind and group size; otherwise
    (mixed types, or some not kept) dequantize the kept ones into `state_dict`, where fuse_qkv fuses them."""
    for i in range(args.n_layer):
        names = [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv")]
        kinds = {kept[n][:2] if n in kept else None for n in names}
        if len(kinds) == 1 and None not in kinds:
            parts = zip(*(kept.pop(n)[2] for n in names))
            kept[f"layers.{i}.attention.wqkv.weight"] = (*kinds.pop(), tuple(torch.cat(p) for p in parts))
        for n in names:
            if n in kept:
                state_dict[n] = dequantize_kept(*kept.pop(n))


def kept_state_dict(kept: dict, state_dict: dict) -> dict:
    """Put the GGUF's kept layers into `state_dict` in our Int4Linear (group 32) / Int8Linear (group 32, or a
    layer's own: 16 for Q6_K) layouts; returns the quantization record."""
    layers, own_groupsizes = {}, {}
    for name, (kind, groupsize, parts) in kept.items():
        prefix = name.removesuffix(".weight")
        if kind == "int4":
            q, scales, zeros = parts
            state_dict.update({f"{prefix}.weight": pack_int4(q), f"{prefix}.scales": scales, f"{prefix}.zeros": zeros})
        else:
            state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.scales"] = parts
            if groupsize != 32:
                own_groupsizes[prefix] = groupsize
        layers[prefix] = kind
    mode = "int4" if "int4" in layers.values() else "int8"
    record = {"mode": mode, "groupsize": 32, "int8_groupsize": 32, "layers": layers, "skipped": {}, "source": "gguf"}
    return {**record, "layer_groupsizes": own_groupsizes} if own_groupsizes else record


def write_gguf_tokenizer(path: Path, reader, directory: Path):
    """tokenizer.json + tokenizer_config.json (chat template) + generation_config.json (EOS) from the GGUF metadata."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    generation = {"bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": eos}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as staging:  # files appear whole or not at all
        staging = Path(staging)
        tokenizer.save_pretrained(str(staging))
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for file in sorted(staging.iterdir()):
            with atomic_output(directory / file.name) as tmp:
                shutil.copy(file, tmp)


# ---------------------------------------------------------------- CLI


def convert(checkpoint_dir=None, repo_id=None, gguf=None, dtype=None, checkpoints=Path("checkpoints"),
            keep_quantization=False) -> Path:
    start = time.perf_counter()
    if repo_id:
        checkpoint_dir = download(repo_id, checkpoints)
    quantization = None
    if gguf:
        gguf = Path(gguf)
        output_dir = Path(checkpoint_dir) if checkpoint_dir else checkpoints / gguf.stem.split(".")[0]
        if output_dir.exists() and not output_dir.is_dir():
            raise ConversionError(f"output folder {output_dir} is a file; give --checkpoint_dir a folder")
        output_dir.mkdir(parents=True, exist_ok=True)
        args, state_dict, quantization = convert_gguf(gguf, output_dir, dtype, keep_quantization)
        # Named by what was kept: model_int4.g32.pth (Q4_0/Q4_1 layers, any Q8_0 ones as int8 g32), model_int8.g32.pth
        output = output_dir / (f"model_{quantization['mode']}.g32.pth" if quantization else "model.pth")
    else:
        directory = Path(checkpoint_dir)
        if directory.is_file():
            raise ConversionError(f"checkpoint directory {directory} is a file; give --checkpoint_dir the HF model folder")
        if not directory.is_dir():
            raise ConversionError(f"checkpoint directory {directory} not found")
        output = directory / "model.pth"
        args, state_dict = convert_hf_folder(directory, output, dtype)
    checkpoint.save(output, args, state_dict, quantization)
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    kinds = sorted(set(quantization["layers"].values())) if quantization else []
    what = f"{len(quantization['layers'])} {'/'.join(kinds)} layers kept from the GGUF" if quantization else \
        f"{sum(t.numel() for t in state_dict.values()) / 1e6:.1f} M parameters"
    print(f"Converted {len(state_dict)} tensors ({what}), {size / 1e9:.2f} GB "
          f"in {time.perf_counter() - start:.1f} s -> {output}")
    return output


def run(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, output = parser.add_argument_group("model"), parser.add_argument_group("output")
    quantization = parser.add_argument_group("quantization")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint_dir", type=Path, help="local HF model folder (model.pth is written into it); "
                        "with --gguf, the output folder (required unless --repo_id or --gguf is given)")
    source.add_argument("--repo_id", help="hub id ORG/NAME: downloaded into checkpoints/ORG/NAME, then converted "
                        "(required unless --checkpoint_dir or --gguf is given)")
    model.add_argument("--gguf", type=Path, help="GGUF file to convert (config and tokenizer are taken from it) "
                       "(required unless --checkpoint_dir or --repo_id is given)")
    output.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="stored dtype of float tensors (auto: as in the source; GGUF: bfloat16)")
    quantization.add_argument("--keep_quantization", action="store_true",
                              help="GGUF only: keep Q4_0/Q4_1/Q4_K layers as our int4 g32, Q8_0/Q5_0 layers as int8 "
                                   "g32 and Q6_K as int8 g16 (model_int4.g32.pth or model_int8.g32.pth), no float "
                                   "round trip; other types are dequantized, with a note")
    output.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="where --repo_id and --gguf outputs go")
    if "--gguf" in (argv if argv is not None else sys.argv[1:]):
        # --gguf stands alone as a source; --checkpoint_dir then only names the output folder.
        for action in source._group_actions:
            action.required = False
        source.required = False
    args = parser.parse_args(argv)
    if args.gguf and args.repo_id:
        parser.error("--gguf and --repo_id are two different sources; give one")
    if args.keep_quantization and not args.gguf:
        parser.error("--keep_quantization applies to --gguf sources only")
    convert(args.checkpoint_dir, args.repo_id, args.gguf, DTYPES.get(args.dtype), args.checkpoints, args.keep_quantization)


def main(argv=None):
    cli.run(run, argv)


if __name__ == "__main__":
    main()
