"""Data-free quantization-aware training (LLM-QAT, Liu et al. 2023): a quantized checkpoint distilled from the
float model on text the float model writes itself.

    python scripts/qat.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --mode int4 --groupsize 64
    # -> checkpoints/SmolLM2-135M-Instruct/model_int4.g64.qat.pth, which generate.py, eval.py, tensor parallel
    #    and drafting load like quantize.py's model_int4.g64.pth (same format, same kernels)
    python scripts/qat.py ... --activation_bits 8 --kv_bits 8     # W4A8KV8: the record makes inference round the same way

1. Data: --samples sequences of --length tokens, each from a random first token, its next 3-5 tokens greedy and
   the rest sampled (as LLM-QAT's generate_data.py), written in chunks under `qat_data/` beside the checkpoint
   and merged into one jsonl that later runs reuse (or --text_file: a text cut into --length token pieces).
2. Training: the linears quantize.py would quantize become quantize.QATLinear (weights rounded exactly as
   quantize.py rounds them, optionally 8-bit per-token inputs and an int8 per-token KV cache, all straight
   through); the loss is the KL divergence from the float teacher's next-token distribution; AdamW with a cosine
   schedule, gradient accumulation, a state saved every --save_every steps that a rerun with the same flags
   resumes from.
3. Output: the trained weights rounded by quantize.py's own code into the normal quantized model.pth.
"""
import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpoint  # noqa: E402
import cli  # noqa: E402
import memory  # noqa: E402
import quantize  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402
from generate import check_device, load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

GREEDY_TOKENS = (3, 5)  # LLM-QAT: the first 3-5 generated tokens greedy, then sampling
GENERATION_BATCH = 32  # rows written together (one KV cache of this many rows)


# ---------------------------------------------------------------- data


def self_generated_data(model, folder: Path, samples: int, length: int, seed: int) -> torch.Tensor:
    """[samples, length] tokens the model writes itself (quantize.self_generated_text), GENERATION_BATCH rows at
    a time, each chunk saved as it is done (an interrupted run keeps its chunks) and merged into one jsonl."""
    name = f"n{samples}.len{length}.seed{seed}"
    merged = folder / f"{name}.jsonl"
    if merged.is_file():
        rows = [json.loads(line)["tokens"] for line in merged.read_text().splitlines()]
        if len(rows) == samples and all(len(row) == length for row in rows):
            print(f"training data: {merged} ({samples} x {length} tokens, written earlier)", file=sys.stderr)
            return torch.tensor(rows)
    chunks = []
    starts = range(0, samples, GENERATION_BATCH)
    for index, start in enumerate(tqdm(starts, desc="writing training data", unit="chunk")):
        chunk = folder / f"{name}.part{index:04d}.jsonl"
        rows = min(GENERATION_BATCH, samples - start)
        if not chunk.is_file():
            tokens = quantize.self_generated_text(model, rows, length, seed=seed * 100003 + index,
                                                  greedy_tokens=GREEDY_TOKENS, progress=False)
            write_jsonl(chunk, tokens.tolist())
        chunks.append(chunk)
    lines = [line for chunk in chunks for line in chunk.read_text().splitlines()]
    with checkpoint.atomic_output(merged) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    for chunk in chunks:
        chunk.unlink()
    print(f"training data: {merged} ({samples} x {length} tokens)", file=sys.stderr)
    return torch.tensor([json.loads(line)["tokens"] for line in lines])


def write_jsonl(path: Path, rows: list):
    path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_output(path) as tmp:
        Path(tmp).write_text("".join(json.dumps({"tokens": row}) + "\n" for row in rows))


def text_file_data(path: Path, tokenizer_dir: Path, length: int, batch_size: int) -> torch.Tensor:
    """A text cut into pieces of `length` tokens (the remainder dropped)."""
    ids = load_tokenizer(tokenizer_dir).encode(path.read_text(errors="replace"))
    pieces = len(ids) // length
    if pieces < batch_size:
        raise UsageError(f"{path} has {len(ids)} tokens, fewer than --batch_size {batch_size} sequences of --length "
                         f"{length}; give a longer text or lower --length / --batch_size")
    return torch.tensor(ids[:pieces * length]).view(pieces, length)


# ---------------------------------------------------------------- training


def prepare_for_training(model, length: int, batch_size: int, kv_bits=None):
    """Masks and rope tables for whole sequences of `length`; no KV cache is kept (each step sees its whole
    sequences), or, with kv_bits 8, the keys and values rounded as the int8 cache rounds them."""
    model.setup_caches(batch_size, length)
    for layer in model.layers:
        layer.attention.kv_cache = quantize.FakeQuantKV() if kv_bits else None


def distillation_loss(student_logits, teacher_logits) -> torch.Tensor:
    """KL(teacher || student) per token, averaged: cross-entropy to the teacher's soft labels minus its entropy."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


# Compiled, the loss is one fused pass over the [tokens, vocabulary] logits: 0.2 s instead of 3 s a step for
# SmolLM2 (4 x 256 tokens, 49152 words) on 2 cores, a sixth of the step.
compiled_distillation_loss = torch.compile(distillation_loss, dynamic=False)


def batch_rows(step: int, micro: int, accumulation: int, batch_size: int, count: int, seed: int) -> list:
    """The data rows of one micro-batch: epochs of a shuffled order that depends only on the seed and the
    epoch, so that a resumed run sees exactly what an uninterrupted one would."""
    first = (step * accumulation + micro) * batch_size
    rows = []
    for index in range(first, first + batch_size):
        epoch, offset = divmod(index, count)
        order = list(range(count))
        random.Random(seed * 1000 + epoch).shuffle(order)
        rows.append(order[offset])
    return rows


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def run_identity(args, data: torch.Tensor) -> str:
    """What a saved training state must share with this run to be resumed."""
    fields = {key: str(getattr(args, key)) for key in ("checkpoint_path", "mode", "groupsize", "activation_bits",
                                                        "kv_bits", "steps", "batch_size", "accumulation", "lr",
                                                        "warmup", "seed")}
    fields["data"] = hashlib.sha1(data.numpy().tobytes()).hexdigest()
    return json.dumps(fields, sort_keys=True)


def train(student, teacher, data, args, state_path: Path, log=print) -> dict:
    """args.steps optimizer steps; returns {losses (one per step), seconds, tokens}."""
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    identity, start, losses = run_identity(args, data), 0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("identity") == identity:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], state["losses"]
            log(f"resuming from step {start} of {args.steps} ({state_path})")
        else:
            log(f"{state_path} is the state of a run with other flags or data: starting over")
    device = student.norm.weight.device
    positions = torch.arange(data.shape[1], device=device)
    # bfloat16 autocast where the device computes it natively (CUDA); on CPU float32 (without AVX512_BF16 or AMX,
    # bfloat16 matmuls are slower than float32 ones), with the weights, gradients and optimizer in float32 always.
    bfloat16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()
    tokens_per_step = args.batch_size * args.accumulation * data.shape[1]
    started, tokens = time.perf_counter(), 0
    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="QAT", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        total = 0.0
        for micro in range(args.accumulation):
            rows = batch_rows(step, micro, args.accumulation, args.batch_size, len(data), args.seed)
            batch = data[rows].to(device)
            with torch.no_grad(), autocast():
                teacher_logits = teacher(batch, positions)
            with autocast():
                student_logits = student(batch, positions)
            loss = compiled_distillation_loss(student_logits, teacher_logits) / args.accumulation
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        tokens += tokens_per_step
        progress.set_postfix(loss=f"{total:.4f}", tokens_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            with checkpoint.atomic_output(state_path) as tmp:
                torch.save({"identity": identity, "step": step + 1, "losses": losses, "model": student.state_dict(),
                            "optimizer": optimizer.state_dict()}, tmp)
    return dict(losses=losses, seconds=time.perf_counter() - started, tokens=tokens)


@torch.no_grad()
def write_quantized(student, quantization: dict, output: Path, activation_bits=None, kv_bits=None):
    """The trained float weights rounded by quantize.swap_linears (the rounding QATLinear trained through) and
    saved as quantize.py saves: the file dequantizes to exactly the weights the student computed with."""
    quantize.linears_from_qat(student)
    student.tie_weights()
    if activation_bits:
        quantization["activation_bits"] = activation_bits
    if kv_bits:
        quantization["kv_cache_bits"] = kv_bits
    quantize.swap_linears(student, quantization, quantize_weights=True)
    checkpoint.save(output, student.args, student.state_dict(), quantization)


# ---------------------------------------------------------------- the script


def output_path(args) -> Path:
    if args.output is not None:
        return args.output
    suffix = f"{args.mode}.g{args.groupsize}" if args.groupsize else args.mode
    suffix += f".a{args.activation_bits}" if args.activation_bits else ""
    suffix += f".kv{args.kv_bits}" if args.kv_bits else ""
    return args.checkpoint_path.with_name(f"{args.checkpoint_path.stem}_{suffix}.qat.pth")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    groups = {title: parser.add_argument_group(title) for title in ("model", "quantization", "training", "output")}
    model, quantization, training, output = groups.values()
    model.add_argument("--checkpoint_path", type=Path, required=True, help="the float model.pth (the teacher)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda if available, else cpu)")
    quantization.add_argument("--mode", choices=["int8", "int4"], required=True)
    quantization.add_argument("--groupsize", type=quantize.groupsize_arg, metavar="{32,64,128,256,channel}",
                              help="int4: inputs per group (default 64), or `channel`: one group per output channel; "
                              "int8: one scale per group of this many inputs instead of one per output channel (the "
                              "default)")
    quantization.add_argument("--activation_bits", type=int, choices=[8], help="round each layer's inputs to 8 bits "
                              "per token (W4A8 / W8A8); the checkpoint records it and inference rounds them too")
    quantization.add_argument("--kv_bits", type=int, choices=[8], help="train through the int8 KV cache's rounding; "
                              "the checkpoint's runs then use --kv_cache_dtype int8 by default (default: none: no KV "
                              "rounding)")
    training.add_argument("--text_file", type=Path, help="train on this text instead of text the model writes itself")
    training.add_argument("--samples", type=int, default=160, help="self-generated sequences")
    training.add_argument("--length", type=int, default=256, help="tokens per sequence")
    training.add_argument("--steps", type=int, default=110, help="optimizer steps (default: %(default)s; with the "
                          "other defaults, SmolLM2-135M trains in about 30 minutes on 2 CPU cores)")
    training.add_argument("--batch_size", type=int, default=4, help="sequences per micro-batch")
    training.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    training.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW, cosine decay)")
    training.add_argument("--warmup", type=int, default=10, help="steps of linear warm-up")
    training.add_argument("--save_every", type=int, default=50, help="save the training state every this many steps")
    training.add_argument("--seed", type=int, default=0)
    output.add_argument("--output", type=Path, help="default: model_<mode>[.g<groupsize>][.a8][.kv8].qat.pth beside the checkpoint")
    output.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.mode == "int4" and args.groupsize is None:
        args.groupsize = 64
    args.groupsize = args.groupsize or None  # quantize.PER_CHANNEL: None, as the quantization record has it
    checks = [(args.steps < 1, "--steps must be at least 1"), (args.samples < 1, "--samples must be at least 1"),
              (args.length < 2, "--length must be at least 2"),
              (args.batch_size < 1 or args.accumulation < 1, "--batch_size and --accumulation must be at least 1"),
              (args.save_every < 1, "--save_every must be at least 1"), (args.lr <= 0, "--lr must be positive"),
              (args.warmup < 0, "--warmup must be at least 0")]
    for failed, message in checks:
        if failed:
            parser.error(message)
    return args


def run(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    check_device(device, torch.float32)
    output = output_path(args)
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it, or --output another path")
    if args.text_file is not None and not args.text_file.is_file():
        raise UsageError(f"text file {args.text_file} not found")
    ckpt = checkpoint.load(args.checkpoint_path)
    if ckpt.quantization:
        raise UsageError(f"{args.checkpoint_path} is already quantized ({ckpt.quantization['mode']}); "
                         "train from the float checkpoint")
    if args.length > ckpt.args.max_position_embeddings:
        raise UsageError(f"--length {args.length} is longer than the model's context "
                         f"({ckpt.args.max_position_embeddings})")
    teacher = load_model(args.checkpoint_path, device, torch.float32)
    quantization = quantize.plan(teacher, args.mode, args.groupsize, args.groupsize if args.mode == "int8" else None,
                                 refuse_if_none=True)
    torch.manual_seed(args.seed)
    if args.text_file is not None:
        data = text_file_data(args.text_file, args.checkpoint_path.parent, args.length, args.batch_size)
    else:
        data = self_generated_data(teacher, args.checkpoint_path.parent / "qat_data", args.samples, args.length,
                                   args.seed)

    student = load_model(args.checkpoint_path, device, torch.float32)
    count = quantize.swap_for_qat(student, quantization, args.activation_bits)
    prepare_for_training(teacher, args.length, args.batch_size)
    prepare_for_training(student, args.length, args.batch_size, args.kv_bits)
    teacher.requires_grad_(False)
    student.train()
    state_path = output.with_name(output.name + ".state")
    result = train(student, teacher, data, args, state_path, log=lambda line: print(line, file=sys.stderr))

    quantization.update(qat=dict(data=str(args.text_file or "self-generated"), sequences=len(data),
                                 length=args.length, steps=args.steps, batch_size=args.batch_size,
                                 accumulation=args.accumulation, lr=args.lr, seed=args.seed))
    write_quantized(student, quantization, output, args.activation_bits, args.kv_bits)
    state_path.unlink(missing_ok=True)
    losses = result["losses"]
    print(f"QAT {args.mode} {f'g{args.groupsize}' if args.groupsize else 'per channel'}: {count} linears, {args.steps} steps of "
          f"{args.batch_size * args.accumulation} x {args.length} tokens on {len(data)} sequences, distillation loss "
          f"{losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10 steps), "
          f"{time.perf_counter() - start:.0f} s in all, {result['tokens'] / max(result['seconds'], 1e-9):.0f} "
          f"training tokens/s this run, peak memory {memory.peak_memory_gb(device):.2f} GB -> {output}")
    for name, reason in quantization["skipped"].items():
        print(f"  left in float: {name} ({reason})")
    return output


def main(argv=None):
    cli.run(run, argv)


if __name__ == "__main__":
    main()
