"""Generate text: prefill the prompt, then a torch.compile'd one-token decode loop over a static KV cache.

    python generate.py --compile --chat --prompt "What is the capital of France?"
    python generate.py --compile --chat --interactive --checkpoint_path checkpoints/ORG/NAME/model.pth
    torchrun --standalone --nproc_per_node=2 generate.py --compile [--pipeline_stages 15,15]   # see tp.py
"""
import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import tp
from convert_hf_checkpoint import ConversionError, load_checkpoint
from model import Attention, ModelArgs, Transformer
from tokenizer import StreamingDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


# ---------------------------------------------------------------- sampling


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0):
    """Next token [batch, 1] from the last position's logits, and the distribution it was drawn from."""
    logits = logits[:, -1].float()
    if temperature <= 0:  # greedy
        return logits.argmax(dim=-1, keepdim=True), torch.softmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Exponential-race sampling: same distribution as multinomial, without a device sync.
    noise = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / noise, dim=-1, keepdim=True), probs


# ---------------------------------------------------------------- the loop


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    return sample(model(x, input_pos), **sampling)[0]


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, **sampling):
    return sample(model(x, input_pos), **sampling)


def decode_n_tokens(model, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int, stop_ids: Tensor,
                    callback: Callable, **sampling) -> list:
    """Decode until num_new_tokens or until every row has produced a stop token."""
    new_tokens = []
    finished = torch.zeros(cur_token.shape[0], dtype=torch.bool, device=cur_token.device)
    for _ in range(num_new_tokens):
        next_token, _ = decode_one_token(model, cur_token, input_pos, **sampling)
        input_pos += 1
        cur_token = next_token.clone()  # CUDA graphs reuse their output buffers
        new_tokens.append(cur_token)
        callback(cur_token)
        finished |= torch.isin(cur_token[:, 0], stop_ids)
        if finished.all():
            break
    return new_tokens


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, batch_size: int = 1,
             max_seq_length: Optional[int] = None, stop_ids=(), callback: Callable = lambda token: None,
             timings: Optional[dict] = None, **sampling) -> Tensor:
    """Prompt [T] (repeated batch_size times) or [batch, T] -> [batch, T + generated].
    Rows that stopped early keep tokens past their stop; cut them with `until_stop`."""
    x = prompt if prompt.dim() == 2 else prompt.view(1, -1).repeat(batch_size, 1)
    batch_size, length = x.shape
    device = prompt.device
    max_seq_length = max_seq_length or length + max_new_tokens
    max_new_tokens = min(max_new_tokens, max_seq_length - length)
    with torch.device(device):
        model.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length)
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)

    start = time.perf_counter()
    first = prefill(model, x, torch.arange(length, device=device), **sampling).clone()
    callback(first)
    synchronize(device)
    prefill_done = time.perf_counter()
    tokens = [first]
    if max_new_tokens > 1 and not torch.isin(first[:, 0], stop_ids).all():
        input_pos = torch.tensor([length], device=device, dtype=torch.long)
        tokens += decode_n_tokens(model, first, input_pos, max_new_tokens - 1, stop_ids, callback, **sampling)
    synchronize(device)
    if timings is not None:
        timings.update(prefill_s=prefill_done - start, decode_s=time.perf_counter() - prefill_done,
                       decode_tokens=len(tokens) - 1)
    return torch.cat([x, *tokens], dim=1)


def until_stop(tokens: list, stop_ids) -> list:
    """Tokens up to (not including) the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class DecodeLinear(torch.nn.Linear):
    """A Linear whose one-token product is written as a reduction, for torch.compile on CPU.

    Inductor turns `(x * W).sum(-1)` into one vectorised C++ loop that reads the 16-bit weights once,
    widens them in registers and accumulates in float32. On a 2-core AVX2 machine that reads SmolLM2's
    weights at about twice the speed of the oneDNN bf16 linear (scripts/bench.py; numbers in the README).
    Longer inputs (prefill) take the ordinary matmul. Eager mode never sees this class.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != 1:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = (x[..., None, :].float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class DecodeAttention(Attention):
    """Attention whose one-query-token case is written as reductions, for torch.compile on CPU.

    One query row attends over a small cache; as elementwise products and sums, inductor fuses it into its
    own loops instead of calling the flash-attention kernel (about 85 us per layer call here). Query heads
    are grouped over their KV head, so the cache is read as it is. Measured (scripts/bench.py conditions):
    int4 86 -> 109 tok/s; bfloat16 and int8 unchanged within noise.
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if q.shape[2] != 1:
            return super().attend(q, k, v, mask)
        batch, heads, _, head_dim = q.shape
        kv_heads = k.shape[1]
        q = q.view(batch, kv_heads, heads // kv_heads, 1, head_dim).float()
        scores = (q * k[:, :, None].float()).sum(-1) * head_dim ** -0.5  # [batch, kv_heads, group, cache_len]
        scores = scores.masked_fill(~mask, -float("inf"))  # mask [.., 1, cache_len] broadcasts over the group
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [batch, kv_heads, group, head_dim]
        return out.view(batch, heads, 1, head_dim).to(k.dtype)


EAGER_FUNCTIONS = {"decode_one_token": decode_one_token, "prefill": prefill}


def compile_functions(model: Transformer, device, compile_prefill: bool = False):
    """Compile the decode step (and optionally prefill) with settings chosen per device, by measurement.

    Rebinds this module's decode_one_token / prefill (as gpt-fast does), always from the eager originals."""
    global decode_one_token, prefill
    decode_one_token, prefill = EAGER_FUNCTIONS["decode_one_token"], EAGER_FUNCTIONS["prefill"]
    if torch.device(device).type == "cuda":
        decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    else:
        import torch._inductor.config as inductor_config

        for module in model.modules():
            if type(module) is torch.nn.Linear:  # plain float linears only; quantized modules keep their kernels
                module.__class__ = DecodeLinear
            elif type(module) is Attention:
                module.__class__ = DecodeAttention
        # cpp_wrapper drops Python launch overhead between kernels. Freezing stays off: it would fold the
        # weights' float() into float32 copies and double the bytes read per token.
        inductor_config.cpp_wrapper = True
        decode_one_token = torch.compile(decode_one_token, fullgraph=True)
    if compile_prefill:
        prefill = torch.compile(prefill, fullgraph=True, dynamic=True)


# ---------------------------------------------------------------- loading


def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16, shard: Optional[Callable] = None) -> Transformer:
    """Build on the meta device, then assign the memory-mapped weights: no second copy of the model in memory.
    `shard` (tp.Layout.shard) cuts this rank's part before anything is converted, so only that part is read."""
    checkpoint = load_checkpoint(Path(checkpoint_path))
    args = ModelArgs.from_dict(checkpoint["model_args"])
    quantization = checkpoint.get("quantization")
    with torch.device("meta"):
        model = Transformer(args)
    if quantization:  # the file says how it was quantized: swap in the same modules before assigning
        import quantize

        quantize.swap_linears(model, quantization)
    tied = args.tie_word_embeddings and type(model.output) is torch.nn.Linear
    model.load_state_dict(checkpoint["state_dict"], assign=True, strict=not tied)
    model.tie_weights()
    if shard is not None:
        model = shard(model)
    model = model.to(device=device, dtype=dtype).eval()
    if quantization:
        quantize.prepare_for_device(model, dtype)
    return model


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights read per decoded token: every weight (quantized buffers too), counted once, except
    the embedding table, of which a token reads one row, unless it doubles as the output projection."""
    caches = ("kv_cache", "rope_", "causal_mask", "sliding_mask")
    tensors = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not any(part in name for part in caches)}
    if getattr(model.output, "weight", None) is not model.tok_embeddings.weight:
        tensors.pop(id(model.tok_embeddings.weight))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memory_figures(model: Transformer, device) -> dict:
    """Parameter count (of the whole model), resident weights, KV cache and peak memory of this process."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Transformer(model.args).parameters())  # logical count, any precision
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    caches = {id(t) for layer in model.layers if layer.attention.kv_cache is not None
              for t in layer.attention.kv_cache.buffers()}
    cache_bytes = sum(tensors[i].numel() * tensors[i].element_size() for i in caches)
    rope_and_masks = {id(t) for name, t in model.named_buffers() if name.startswith(("rope_", "causal_mask", "sliding_mask"))}
    model_bytes = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in caches | rope_and_masks)
    return dict(parameters=parameters, model_bytes=model_bytes, cache_bytes=cache_bytes,
                peak_bytes=peak_memory_gb(device) * 1e9)


def memory_report(model: Transformer, device) -> str:
    """memory_figures as one markdown table row."""
    f = memory_figures(model, device)
    return ("| parameters | model memory | KV cache memory | peak memory |\n|---:|---:|---:|---:|\n"
            f"| {f['parameters'] / 1e6:.1f} M | {f['model_bytes'] / 1e6:.2f} MB | {f['cache_bytes'] / 1e6:.1f} MB "
            f"| {f['peak_bytes'] / 1e6:.0f} MB |")


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


# ---------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"))
    parser.add_argument("--prompt", default="Hello, my name is", help="the prompt (the user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--max_seq_length", type=int, default=None, help="KV cache length (default: prompt + new tokens)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile_prefill", action="store_true", help="torch.compile prefill too (dynamic shapes)")
    parser.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens (benchmarks)")
    parser.add_argument("--report_memory", action="store_true", help="print parameters, model, KV cache and peak memory")
    parser.add_argument("--profile", type=Path, default=None, help="write a chrome trace of the last sample here")
    parser.add_argument("--pipeline_stages", default=None,
                        help="under torchrun: layers per stage, e.g. 10,10,12 (default: tensor parallel)")
    args = parser.parse_args(argv)
    if args.pipeline_stages is not None:
        try:
            args.pipeline_stages = tp.parse_stages(args.pipeline_stages)
        except ValueError as error:
            parser.error(str(error))
    checks = [
        (args.num_samples < 1, "--num_samples must be at least 1"),
        (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.temperature < 0, "--temperature must be >= 0 (0 is greedy)"),
        (args.top_k is not None and args.top_k < 1, "--top_k must be at least 1"),
        (not 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.max_seq_length is not None and args.max_seq_length < 2, "--max_seq_length must be at least 2"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)  # argparse prints usage and exits with code 2
    return args


def encode_prompt(tokenizer: Tokenizer, text: str, chat: bool, system: Optional[str] = None) -> list:
    if not chat:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages)


def run(args):
    if not args.checkpoint_path.is_file():
        raise UsageError(f"checkpoint {args.checkpoint_path} not found; create it with scripts/prepare.sh or convert_hf_checkpoint.py")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    torch.manual_seed(args.seed)
    layout = tp.init(device, args.pipeline_stages)  # None unless torchrun started several processes
    if layout is not None:
        device = layout.device
        if args.interactive:
            raise UsageError("--interactive is not supported under torchrun (stdin is not shared); pass --prompt")
    load_start = time.perf_counter()
    model = load_model(args.checkpoint_path, device, DTYPES[args.dtype], shard=layout and layout.shard)
    try:
        tokenizer = Tokenizer(args.checkpoint_path.parent)
    except FileNotFoundError:
        raise
    except Exception as error:  # tokenizers/sentencepiece raise bare exceptions on a corrupt file
        raise UsageError(f"cannot read the tokenizer in {args.checkpoint_path.parent} ({error}); convert the checkpoint again")
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - load_start:.2f} s", file=sys.stderr)
    stop_ids = () if args.ignore_eos else tokenizer.eos_ids
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    prompts = sys.stdin if args.interactive else [args.prompt]
    if args.interactive and args.max_seq_length is None:
        args.max_seq_length = 1024  # one cache size for every prompt: a compiled decode is not rebuilt per prompt
    compiled = False
    for text in prompts:
        text = text.rstrip("\n")
        if args.interactive and not text:
            continue
        try:
            ids = encode_prompt(tokenizer, text, args.chat, args.system)
        except ValueError as error:
            raise UsageError(str(error))
        max_seq_length = args.max_seq_length or len(ids) + args.max_new_tokens
        if len(ids) >= max_seq_length:
            raise UsageError(f"the prompt is {len(ids)} tokens but the KV cache holds {max_seq_length}; raise --max_seq_length or shorten the prompt")
        prompt = torch.tensor(ids, dtype=torch.long, device=device)
        if args.compile and not compiled:
            compile_functions(model, device, args.compile_prefill)
            compile_start = time.perf_counter()
            generate(model, prompt, min(args.max_new_tokens, 4), batch_size=args.batch_size,
                     max_seq_length=max_seq_length, stop_ids=(), **sampling)
            print(f"Compilation time: {time.perf_counter() - compile_start:.2f} s", file=sys.stderr)
            compiled = True
        for sample_index in range(args.num_samples):
            stream = StreamingDecoder(tokenizer)
            printing = [True]

            def callback(token):
                # Stream the first row until it stops; other rows are printed at the end.
                if printing[0]:
                    if int(token[0, 0]) in stop_ids:
                        printing[0] = False
                    else:
                        print(stream.push(int(token[0, 0])), end="", flush=True)

            profile = args.profile and sample_index == args.num_samples - 1
            profiler = torch.profiler.profile() if profile else contextlib.nullcontext()
            timings = {}
            tp.reset_communication(model)
            with profiler:
                output = generate(model, prompt, args.max_new_tokens, batch_size=args.batch_size,
                                  max_seq_length=max_seq_length, stop_ids=stop_ids, callback=callback,
                                  timings=timings, **sampling)
            print()
            for row in range(1, args.batch_size):
                print(f"[{row}] " + tokenizer.decode(until_stop(output[row, len(ids):].tolist(), stop_ids)))
            if profile:
                profiler.export_chrome_trace(str(args.profile))
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
            new_tokens = timings["decode_tokens"] + 1
            tokens_per_s = timings["decode_tokens"] * args.batch_size / max(timings["decode_s"], 1e-9)
            print(
                f"Generated {new_tokens} tokens in {timings['prefill_s'] + timings['decode_s']:.2f} s: "
                f"{tokens_per_s:.1f} tok/s, {weight_bytes(model) * tokens_per_s / args.batch_size / 1e9:.1f} GB/s, "
                f"peak memory {peak_memory_gb(device):.2f} GB (prefill {len(ids)} tokens in {timings['prefill_s']:.2f} s)",
                file=sys.stderr,
            )
            if layout is not None:
                print(tp.communication_line(model, layout, timings["decode_tokens"]), file=sys.stderr)
    if args.report_memory and layout is not None:
        table = tp.memory_report(model, layout, memory_figures(model, device))  # every rank gathers; rank 0 prints
        print(table or "", file=sys.stderr)
    elif args.report_memory:
        print(memory_report(model, device), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, ConversionError, FileNotFoundError, tp.DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        tp.finish()


if __name__ == "__main__":
    main()
