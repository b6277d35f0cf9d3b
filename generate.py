"""Generate text: prefill the prompt, then a torch.compile'd one-token decode loop over a static KV cache.

    python generate.py --compile --chat --prompt "What is the capital of France?"
    python generate.py --compile --chat --interactive --checkpoint_path checkpoints/ORG/NAME/model.pth
    torchrun --standalone --nproc_per_node=2 generate.py --compile [--pipeline_stages 15,15]   # see tp.py, pipeline.py

Drafting (speculative decoding, Medusa) lives in drafting.py and is passed to `generate` as a drafter.
"""
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import checkpoint
import compiled_step
import cpu_ops
import drafting
import decode_kernels
import memory
import pipeline
import quantize
import streaming
import tp
import cli
from argparse import ArgumentTypeError

from cli import ArgumentParser, UsageError
from medusa import load_medusa_heads, parse_tree
from model import Transformer
from sampling import decode_one_token, sample
from tokenizer import StreamingDecoder, Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = {"auto": None, "int8": torch.int8}  # auto: the model's dtype


# ---------------------------------------------------------------- the loop


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, **sampling):
    """The first new token, and the last position's final hidden state (what Medusa heads read)."""
    logits, hidden = model(x, input_pos, return_hidden=True, last_only=True)
    return sample(logits, **sampling)[0], hidden[:, -1]


def decode_n_tokens(model: Transformer, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int, stop_ids: Tensor,
                    callback: Callable, new_tokens: list, background=None, stages: Optional[list] = None, **sampling):
    """Append to new_tokens until num_new_tokens, or until every row has produced a stop token. With a
    `background` compile (compiled_step.py), each token takes the best step it has ready; `stages` gets its name."""
    finished = torch.zeros(cur_token.shape[0], dtype=torch.bool, device=cur_token.device)
    can_stop = stop_ids.numel() > 0  # otherwise (--ignore_eos, benchmarks) no check: it would sync the device
    step = decode_one_token
    for _ in range(num_new_tokens):
        if background is not None:
            stage, step = background.next_step()
            stages.append(stage)
        next_token, _ = step(model, cur_token, input_pos, **sampling)
        input_pos += 1
        cur_token = next_token.clone()  # CUDA graphs reuse their output buffers
        new_tokens.append(cur_token)
        callback(cur_token)
        if can_stop:
            finished |= torch.isin(cur_token[:, 0], stop_ids)
            if finished.all():
                break


class PromptCache:
    """The token ids whose K/V the model's cache holds (one sequence), so that a prompt sharing a prefix with
    them prefills only the tokens after it: a chat resends its whole history every turn, a server's requests
    share a system prompt. generate() keeps it up to date, also when a callback or Ctrl-C stops it."""

    def __init__(self):
        self.ids: list = []

    def shared_prefix(self, ids: list) -> int:
        """How many of ids' first tokens are cached; never all of them: the last prompt token is always run,
        its logits give the first new token."""
        limit, n = min(len(self.ids), len(ids) - 1), 0
        while n < limit and self.ids[n] == ids[n]:
            n += 1
        return n


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, batch_size: int = 1,
             max_seq_length: Optional[int] = None, stop_ids=(), callback: Callable = lambda token: None,
             timings: Optional[dict] = None, drafter=None, background=None, prompt_cache: Optional[PromptCache] = None,
             **sampling) -> Tensor:
    """Prompt [T] (repeated batch_size times) or [batch, T] -> [batch, T + generated].

    Rows that stopped early keep tokens past their stop; cut them with `until_stop`. With a drafter
    (drafting.SpeculativeDrafter or MedusaDrafter, batch 1): the same tokens as without it when greedy.
    With a background compile (compiled_step.BackgroundCompile, no drafter), decoding starts eager and takes
    each compiled stage as it becomes ready. With a prompt_cache (batch 1), the prompt's prefix that is already
    in the KV cache is not prefilled again. timings gets prefill_s, decode_s, decode_tokens, reused_tokens (the
    prompt tokens taken from the cache), the drafts accepted per step, the stage of each decoded token, and
    interrupted=True when Ctrl-C stopped the decode (the tokens so far are returned)."""
    x = prompt if prompt.dim() == 2 else prompt.view(1, -1).repeat(batch_size, 1)
    batch_size, length = x.shape
    device = prompt.device
    slack = drafter.slack if drafter is not None else 0  # verification writes ahead of the last kept token
    max_seq_length = max_seq_length or length + max_new_tokens + slack
    max_new_tokens = min(max_new_tokens, max_seq_length - length - slack)
    cache_size = (model.max_batch_size, model.max_seq_length) if prompt_cache is not None else None
    with torch.device(device):
        for m in [model, *(drafter.models if drafter is not None else [])]:
            if isinstance(m, Transformer):
                m.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length)
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    reused = 0
    if prompt_cache is not None:
        if batch_size != 1 or (model.max_batch_size, model.max_seq_length) != cache_size:
            prompt_cache.ids = []  # a new cache (or rows that differ) holds nothing of before
        prompt_ids = x[0].tolist()
        reused = prompt_cache.shared_prefix(prompt_ids) if batch_size == 1 else 0
        prompt_cache.ids = prompt_ids[:reused]  # still true if prefill fails: it writes positions >= reused only

    start = time.perf_counter()
    prompt_pos = torch.arange(length, device=device)
    first, last_hidden = prefill(model, x[:, reused:], prompt_pos[reused:], **sampling)
    first = first.clone()
    if drafter is not None:
        drafter.start(x, prompt_pos, last_hidden)
    callback(first)
    synchronize(device)
    prefill_done = time.perf_counter()
    tokens, accepted_counts, stages, interrupted = [first], [], [], False
    try:
        if max_new_tokens > 1 and not torch.isin(first[:, 0], stop_ids).all():
            if drafter is None:
                input_pos = torch.tensor([length], device=device, dtype=torch.long)
                decode_n_tokens(model, first, input_pos, max_new_tokens - 1, stop_ids, callback, tokens, background,
                                stages, **sampling)
            else:
                def plain_decode(cur_token, position, count, new_tokens):  # runs of plain steps, without the drafter
                    decode_n_tokens(model, cur_token, torch.tensor([position], device=device), count, stop_ids, callback,
                                    new_tokens, **sampling)

                drafting.drafted_decode_n_tokens(model, drafter, first, length, max_new_tokens - 1, stop_ids, callback,
                                                 tokens, accepted_counts, decode_one_token, plain_decode, **sampling)
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated; the caller reports it
        interrupted = True
    finally:  # the K/V of every token but the last one produced are written (the last was never fed back)
        if prompt_cache is not None and batch_size == 1:
            prompt_cache.ids = prompt_ids + [int(token) for token in tokens[:-1]]
    synchronize(device)
    if timings is not None:
        timings.update(prefill_s=prefill_done - start, decode_s=time.perf_counter() - prefill_done,
                       decode_tokens=len(tokens) - 1, reused_tokens=reused, accepted=accepted_counts, stages=stages,
                       interrupted=interrupted)
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


EAGER_FUNCTIONS = {"decode_one_token": decode_one_token, "prefill": prefill}


def compile_functions(models: list, device, compile_prefill: bool = False, drafter=None, mode: str = "whole"):
    """Compile the decode step (and optionally prefill, and the drafter's steps) with the decode kernel paths
    of `device` (decode_kernels.py) for `models` (the target, and a draft model or Medusa heads). mode (CPU):
    "regional" compiles one transformer block for all layers, "whole" the step as one C++ graph (decode_kernels.py);
    under torchrun always "whole" (the ranks' collectives are not tried inside a region); "auto" is "whole".
    This compiles on the first call, which waits for it: what drafting, CUDA, torchrun and --compile_prefill
    use; the plain CPU decode builds its step in the background instead (compiled_step.py).

    Rebinds this module's functions (as gpt-fast does), always from the eager originals, and starts from an
    empty dynamo cache, the steps compiled for static shapes: a process that compiled for other models or another
    cache length before (bench.py's rows, a smaller draft model's step) would otherwise recompile the step with
    dynamic sizes (dynamo's automatic dynamic shapes), slower code than a static graph: bench.py's prompt lookup
    row, compiled after the plain rows with a cache 5 positions longer, ran at 0.88x plain, where alone, in
    processes of their own at one cache length, the two ran 25-27 and 27-29 ms a token."""
    global decode_one_token, prefill
    torch._dynamo.reset()
    decode_one_token, prefill = EAGER_FUNCTIONS.values()
    if torch.distributed.is_initialized() or mode == "auto":
        mode = "whole"
    decode_kernels.use_decode_kernels(models, device, mode=mode)
    if torch.device(device).type == "cpu":  # int8 layers: inductor's fused reduction is one more candidate
        quantize.choose_compiled_paths(models, float_dtype(models[0]), cpu_ops.KernelChoices())
        if mode == "whole":  # a decoded token's block in one native call, where measured faster
            decode_kernels.choose_block_paths(models, cpu_ops.KernelChoices())
    cuda_graphs = "reduce-overhead" if torch.device(device).type == "cuda" else None  # CUDA graphs
    decode_one_token = torch.compile(decode_one_token, mode=cuda_graphs, fullgraph=True, dynamic=False)
    if drafter is not None:
        drafting.compile_drafting()
    if compile_prefill:
        prefill = torch.compile(prefill, fullgraph=True, dynamic=True)


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def use_eager():
    global decode_one_token, prefill
    decode_one_token, prefill = EAGER_FUNCTIONS.values()
    drafting.use_eager_drafting()


# ---------------------------------------------------------------- loading


def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16, shard: Optional[Callable] = None,
               kv_cache_dtype: Optional[torch.dtype] = None, memory_budget: Optional[int] = None) -> Transformer:
    """Build on the meta device, then assign the memory-mapped weights: no second copy of the model in memory.
    `shard` (shard_for(layout) under torchrun) cuts this rank's part before anything is converted, so only
    that part is read. kv_cache_dtype (KV_CACHE_DTYPES): what setup_caches will allocate. memory_budget
    (bytes): the layers are streamed from disk each forward, holding at most that much (streaming.py)."""
    ckpt = checkpoint.load(checkpoint_path)
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    if ckpt.quantization:  # the file says how it was quantized: swap in the same modules before assigning
        quantize.swap_linears(model, ckpt.quantization, source=ckpt.path)
    trained_for = torch.int8 if (ckpt.quantization or {}).get("kv_cache_bits") == 8 else None
    if memory_budget is not None:
        if torch.device(device).type != "cpu" or shard is not None:
            raise UsageError("--memory_budget streams layers on the CPU of one process: use --device cpu, without torchrun")
        streaming.stream_model(model, ckpt, dtype, memory_budget)
        model.kv_cache_dtype = kv_cache_dtype or trained_for
        return model.eval()
    checkpoint.load_into(model, ckpt)
    if shard is not None:
        model = shard(model)
    model = model.to(device=device, dtype=dtype).eval()
    if ckpt.quantization:
        quantize.prepare_for_device(model, dtype)
    if torch.device(device).type == "cpu":
        memory.place_in_huge_pages(model)
    # None (--kv_cache_dtype auto): what the checkpoint was trained for (scripts/qat.py --kv_bits), else --dtype
    model.kv_cache_dtype = kv_cache_dtype or trained_for
    return model


def shard_for(layout: tp.Layout) -> Callable:
    """load_model's shard step for this rank: pipeline stages when the layout has them, else tensor parallel."""
    if layout.pipeline_stages:
        return functools.partial(pipeline.shard_pipeline, layout=layout)
    return functools.partial(tp.shard_tensor_parallel, layout=layout)


def check_device(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    try:  # a 16-bit type an old GPU (or a CPU build) has no kernels for fails here, not in the middle of a run
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except RuntimeError as error:
        name = str(dtype).removeprefix("torch.")
        raise UsageError(f"--dtype {name} cannot run on {device} ({str(error).splitlines()[0][:100]}); "
                         "use --dtype float32") from None


# ---------------------------------------------------------------- CLI


def add_model_arguments(parser: ArgumentParser) -> dict:
    """The flags that say which model runs and how: generate.py's, and the server's (server.py). Returns the
    argument groups, {title: group}, for the caller to add its own flags to."""
    groups = {title: parser.add_argument_group(title) for title in ("model", "generation", "compile", "drafting")}
    model, generation, compile_, drafting = groups.values()
    model.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"),
                       help="the model.pth (or a quantized model_int8.pth, model_int4.g32.pth, ...)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    model.add_argument("--max_seq_length", type=int, default=None, help="KV cache length (default: prompt + new tokens)")
    model.add_argument("--kv_cache_dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                       help="int8: keys and values stored as int8 with a scale per token and head (about half the "
                            "KV memory of a 16-bit cache); auto: the model's --dtype, or int8 for a checkpoint "
                            "trained with it (scripts/qat.py --kv_bits 8)")
    model.add_argument("--memory_budget", type=budget_argument, default=None,
                       help="run a model larger than memory: hold at most this much (e.g. 2GB; the KV cache "
                       "included) and stream the other layers from disk each forward (streaming.py; CPU)")
    generation.add_argument("--seed", type=int, default=1234)
    drafting.add_argument("--draft_checkpoint_path", type=Path, default=None,
                          help="speculative decoding with this draft model (same tokenizer; e.g. an int4 copy of the target)")
    drafting.add_argument("--speculate_k", type=int, default=5, help="draft tokens proposed per step (at most, when adaptive)")
    drafting.add_argument("--prompt_lookup_num_tokens", type=int, default=None,
                          help="prompt lookup decoding: draft up to this many tokens copied from where the last few "
                               "tokens occurred earlier in the prompt or the output (no draft model)")
    drafting.add_argument("--max_matching_ngram_size", type=int, default=3, help="prompt lookup: longest n-gram matched")
    drafting.add_argument("--min_matching_ngram_size", type=int, default=2,
                          help="prompt lookup: shortest n-gram matched (1 also drafts after a single matching token)")
    drafting.add_argument("--fixed_draft_length", action="store_true",
                          help="draft --speculate_k / --prompt_lookup_num_tokens tokens every step (default: adapt the "
                               "length to what is accepted, and decode plainly while drafting does not pay)")
    drafting.add_argument("--medusa_checkpoint_path", type=Path, default=None,
                          help="Medusa heads: a folder with medusa_lm_head.safetensors|.pt and config.json (FasterDecoding layout)")
    drafting.add_argument("--medusa_choices", default="chain2", help="candidate tree: a name (chain1, chain2, chain3, "
                          "tree4, tree8, mc_sim_7b_63) or a file with a list of paths such as [[0], [1], [0, 0]]")
    drafting.add_argument("--medusa_sampling", choices=["greedy", "typical"], default="greedy",
                          help="with --temperature > 0, typical acceptance (Medusa's) instead of greedy verification")
    drafting.add_argument("--posterior_threshold", type=float, default=0.09, help="typical acceptance: probability cap")
    drafting.add_argument("--posterior_alpha", type=float, default=0.3, help="typical acceptance: entropy factor")
    compile_.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    compile_.add_argument("--compile_mode", choices=list(compiled_step.STAGES), default="auto",
                          help="CPU: the compiled steps built in the background while decoding starts eager: auto "
                          "(regional, then whole), regional (one transformer block compiled for all layers: 30-40 s "
                          "the first time on 2 cores, 6-26%% fewer tokens/s than whole) or whole (the step as one C++ "
                          "graph: the fastest, 2.5-5 minutes the first time). Saved next to the checkpoint for later runs")
    compile_.add_argument("--compile_prefill", action="store_true", help="torch.compile prefill too (dynamic shapes)")
    compile_.add_argument("--verbose", action="store_true",
                          help="print the kernel path each layer shape takes on this CPU (measured once, then cached)")
    return groups


def budget_argument(text: str) -> int:
    try:
        return streaming.parse_size(text)
    except ValueError as error:
        raise ArgumentTypeError(str(error)) from None


def streaming_without_compile(args):
    """A streamed model decodes eagerly: its layers' weights change place every forward, and reading them, not
    the compute, sets its speed."""
    if args.memory_budget is not None and args.compile:
        print("note: --compile is ignored with --memory_budget (the streamed layers run eagerly: reading them "
              "from disk, not the compute, sets the speed)", file=sys.stderr)
        args.compile = False


def model_argument_checks(args) -> list:
    """(failed, message) for the flags of add_model_arguments."""
    return [
        (args.max_seq_length is not None and args.max_seq_length < 2, "--max_seq_length must be at least 2"),
        (args.speculate_k < 1, "--speculate_k must be at least 1"),
        (args.prompt_lookup_num_tokens is not None and args.prompt_lookup_num_tokens < 1,
         "--prompt_lookup_num_tokens must be at least 1"),
        (args.max_matching_ngram_size < 1, "--max_matching_ngram_size must be at least 1"),
        (not 1 <= args.min_matching_ngram_size <= args.max_matching_ngram_size,
         "--min_matching_ngram_size must be at least 1 and at most --max_matching_ngram_size"),
        (drafting_modes(args) > 1,
         "give one of --draft_checkpoint_path, --medusa_checkpoint_path and --prompt_lookup_num_tokens, not several"),
    ]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    groups = add_model_arguments(parser)
    generation, compile_ = groups["generation"], groups["compile"]
    diagnostics, torchrun = parser.add_argument_group("diagnostics"), parser.add_argument_group("torchrun")
    generation.add_argument("--prompt", default="Hello, my name is", help="the prompt (the user message with --chat)")
    generation.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generation.add_argument("--system", help="system message for --chat")
    generation.add_argument("--interactive", action="store_true",
                            help="read prompts from stdin, one per line, until EOF or /exit; with --chat they are the "
                            "turns of one conversation, its history kept (/reset starts a new one)")
    generation.add_argument("--num_samples", type=int, default=1)
    generation.add_argument("--max_new_tokens", type=int, default=200)
    generation.add_argument("--batch_size", type=int, default=1)
    generation.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generation.add_argument("--top_k", type=int, default=None)
    generation.add_argument("--top_p", type=float, default=1.0)
    generation.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens (benchmarks)")
    compile_.add_argument("--compile_only", action="store_true",
                          help="build the compiled CPU decode step for these settings (--compile_mode, --dtype, "
                          "--batch_size, KV cache length, sampling), save it next to the checkpoint and exit")
    diagnostics.add_argument("--report_memory", action="store_true",
                             help="print parameters, model, KV cache and peak memory")
    diagnostics.add_argument("--profile", type=Path, default=None, help="write a chrome trace of the last sample here")
    torchrun.add_argument("--pipeline_stages", default=None,
                          help="under torchrun: layers per stage, e.g. 10,10,12 (default: tensor parallel)")
    args = parser.parse_args(argv)
    args.compile = args.compile or args.compile_only
    if args.pipeline_stages is not None:
        try:
            args.pipeline_stages = pipeline.parse_stages(args.pipeline_stages)
        except ValueError as error:
            parser.error(str(error))
    checks = model_argument_checks(args) + [
        (args.num_samples < 1, "--num_samples must be at least 1"),
        (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.temperature < 0, "--temperature must be >= 0 (0 is greedy)"),
        (args.top_k is not None and args.top_k < 1, "--top_k must be at least 1"),
        (not 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (drafting_modes(args) and args.batch_size != 1,
         "drafting runs one sequence at a time: use --batch_size 1 with --draft_checkpoint_path, "
         "--medusa_checkpoint_path or --prompt_lookup_num_tokens"),
        (args.compile_only and (drafting_modes(args) or args.compile_prefill or args.interactive
                                or args.memory_budget is not None),
         "--compile_only builds the plain decode step: drop drafting, --compile_prefill, --interactive and "
         "--memory_budget"),
        (args.medusa_sampling == "typical" and args.temperature == 0,
         "--medusa_sampling typical needs --temperature > 0 (at 0 Medusa verifies greedily)"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)  # one line, exit code 2
    return args



def drafting_modes(args) -> int:
    return sum(x is not None for x in (args.draft_checkpoint_path, args.medusa_checkpoint_path,
                                       args.prompt_lookup_num_tokens))


def encode_prompt(tokenizer: Tokenizer, text: Optional[str], chat: bool, system: Optional[str] = None,
                  messages: Optional[list] = None) -> list:
    """The prompt's token ids: text as it is, or with chat, the messages (default: text as the user's) after
    the system message, through the chat template."""
    if not chat:
        return tokenizer.encode(text)
    messages = messages if messages is not None else [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(([{"role": "system", "content": system}] if system else []) + messages)


class Conversation:
    """--chat --interactive: the history as chat messages, rendered whole through the template every turn (the
    KV cache's PromptCache then prefills only the new turn). Turns that no longer fit the cache are dropped,
    oldest first, the system message kept."""

    def __init__(self, tokenizer: Tokenizer, system: Optional[str] = None):
        self.tokenizer, self.system, self.turns = tokenizer, system, []

    def prompt(self, user_text: str, room: int) -> tuple:
        """(the token ids of the history plus this user message, the number of old turns dropped so that they fit
        in `room` tokens). The newest message alone is never dropped: prompt_tensor reports it if too long."""
        self.turns.append([{"role": "user", "content": user_text}])
        dropped = 0
        while True:
            ids = encode_prompt(self.tokenizer, None, True, self.system, sum(self.turns, []))
            if len(ids) <= room or len(self.turns) == 1:
                return ids, dropped
            self.turns.pop(0)
            dropped += 1

    def answered(self, text: str):
        self.turns[-1].append({"role": "assistant", "content": text})

    def reset(self):
        self.turns = []


def load_drafter(args, model: Transformer, tokenizer: Tokenizer, device, shard):
    """The drafting strategy the flags ask for, or None."""
    dtype = DTYPES[args.dtype]
    if args.draft_checkpoint_path is not None:  # sharded the same way as the target under torchrun
        draft_model = load_model(args.draft_checkpoint_path, device, dtype, shard=shard,
                                 kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype])
        drafting.check_same_tokenizer(tokenizer, model, draft_model, args.draft_checkpoint_path)
        return drafting.SpeculativeDrafter(draft_model, args.speculate_k, adaptive=not args.fixed_draft_length)
    if args.prompt_lookup_num_tokens is not None:
        return drafting.PromptLookupDrafter(args.prompt_lookup_num_tokens, args.max_matching_ngram_size,
                                            adaptive=not args.fixed_draft_length,
                                            min_ngram=args.min_matching_ngram_size)
    if args.medusa_checkpoint_path is not None:
        if not args.medusa_checkpoint_path.exists():
            raise UsageError(f"Medusa heads {args.medusa_checkpoint_path} not found; train them with scripts/train_medusa.py")
        try:
            tree = parse_tree(args.medusa_choices)
        except ValueError as error:
            raise UsageError(str(error)) from None
        heads = load_medusa_heads(args.medusa_checkpoint_path, model.args, model.output).to(device=device, dtype=dtype)
        typical = (args.posterior_threshold, args.posterior_alpha) if args.medusa_sampling == "typical" else None
        return drafting.MedusaDrafter(heads, tree, typical)
    return None


def prompt_tensor(args, ids: list, model: Transformer, drafter, device, round_cache: bool = False) -> tuple:
    """The prompt as a tensor and the KV cache length, after checking that both fit. round_cache: a length
    that a saved compiled step serves for other prompts too (compiled_step.cache_length)."""
    if not ids:
        raise UsageError("the prompt is empty; give --prompt some text")
    context = model.args.max_position_embeddings
    if len(ids) > context:
        raise UsageError(f"the prompt is {len(ids)} tokens but the model's context is {context}; shorten the prompt")
    slack = drafter.slack if drafter is not None else 0
    max_seq_length = args.max_seq_length or len(ids) + args.max_new_tokens + slack
    if round_cache and args.max_seq_length is None:
        max_seq_length = compiled_step.cache_length(max_seq_length, context)
    if len(ids) + slack >= max_seq_length:
        raise UsageError(f"the prompt is {len(ids)} tokens but the KV cache holds {max_seq_length}; "
                         "raise --max_seq_length or shorten the prompt")
    cached = [m for m in [model, *(drafter.models if drafter is not None else [])] if isinstance(m, Transformer)]
    memory.check_cache_fits(cached, args.batch_size, max_seq_length, device)
    return torch.tensor(ids, dtype=torch.long, device=device), max_seq_length


def sampling_options(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def generate_and_print(args, model, tokenizer, prompt: Tensor, max_seq_length: int, stop_ids, drafter, layout,
                       profile: bool, background=None, prompt_cache: Optional[PromptCache] = None) -> tuple:
    """One sample: stream the first row's text, print the other rows and the summary.
    (True when Ctrl-C stopped it, the first row's text)."""
    stream, printing = StreamingDecoder(tokenizer), [True]

    def callback(token):  # stream the first row until it stops; other rows are printed at the end
        if printing[0]:
            if int(token[0, 0]) in stop_ids:
                printing[0] = False
            else:
                print(stream.push(int(token[0, 0])), end="", flush=True)

    sampling = sampling_options(args)
    timings = {}
    tp.reset_communication(model)
    profiler = torch.profiler.profile() if profile else contextlib.nullcontext()
    with profiler:
        output = generate(model, prompt, args.max_new_tokens, batch_size=args.batch_size, max_seq_length=max_seq_length,
                          stop_ids=stop_ids, callback=callback, timings=timings, drafter=drafter, background=background,
                          prompt_cache=prompt_cache, **sampling)
    print()
    for row in range(1, args.batch_size):
        print(f"[{row}] " + tokenizer.decode(until_stop(output[row, len(prompt):].tolist(), stop_ids)))
    if profile:
        profiler.export_chrome_trace(str(args.profile))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    tokens_per_s = timings["decode_tokens"] * args.batch_size / max(timings["decode_s"], 1e-9)
    print(f"Generated {timings['decode_tokens'] + 1} tokens{' (interrupted)' if timings['interrupted'] else ''} in "
          f"{timings['prefill_s'] + timings['decode_s']:.2f} s: {tokens_per_s:.{1 if tokens_per_s >= 10 else 2 if tokens_per_s >= 1 else 3}f} tok/s, "
          f"{memory.weight_bytes(model) * tokens_per_s / args.batch_size / 1e9:.1f} GB/s, "
          f"peak memory {memory.peak_memory_gb(prompt.device):.2f} GB "
          f"(prefill {prefill_counts(len(prompt), timings['reused_tokens'])} in {timings['prefill_s']:.2f} s)",
          file=sys.stderr)
    if drafter is not None:
        print(drafting.acceptance_summary(timings["accepted"], drafter.depth), file=sys.stderr)
    if getattr(model, "streamer", None) is not None:
        print(model.streamer.summary(), file=sys.stderr)
    if background is not None:
        print(background.summary(timings["stages"]), file=sys.stderr)
        while background.notes:
            print(background.notes.pop(0), file=sys.stderr)
    if layout is not None:
        print(tp.communication_line(model, layout, timings["decode_tokens"]), file=sys.stderr)
    return timings["interrupted"], tokenizer.decode(until_stop(output[0, len(prompt):].tolist(), stop_ids))


def prefill_counts(prompt_tokens: int, reused: int) -> str:
    if not reused:
        return f"{prompt_tokens} tokens"
    return f"{prompt_tokens - reused} new prompt tokens, {reused} reused from the KV cache,"


def kernel_paths_report(models: list, device) -> str:
    """Which kernel path each layer shape takes (quantize.py's measured choice; decode_kernels.py's under compile)."""
    lines = quantize.kernel_paths_summary(models) + decode_kernels.float_paths_summary(models) + decode_kernels.block_paths_summary(models)
    where = cpu_ops.cpu_description() if torch.device(device).type == "cpu" else str(device)
    return "\n".join([f"Kernel paths on {where}:"] + [f"  {line}" for line in lines or ["no quantized or compiled layers"]])


def report_memory(model: Transformer, layout, device):
    figures = memory.memory_figures(model, device)
    if layout is None:
        print(memory.memory_report(model, device), file=sys.stderr)
        return
    rows = tp.gather_rows({**figures, "rank": layout.rank, "holds": getattr(model, "shard_description", "")}, layout)
    if rows is not None:  # rank 0
        print(memory.rank_memory_table(rows), file=sys.stderr)


def in_background_compile(args, device, layout, drafter) -> bool:
    return args.compile and device.type == "cpu" and layout is None and drafter is None and not args.compile_prefill


def build_command(args, max_seq_length: int) -> list:
    """generate.py --compile_only with everything that decides the compiled step: compiled_step.py's build process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--checkpoint_path", str(args.checkpoint_path.resolve()),
               "--device", "cpu", "--dtype", args.dtype, "--batch_size", str(args.batch_size),
               "--max_seq_length", str(max_seq_length), "--temperature", repr(args.temperature),
               "--top_p", repr(args.top_p), "--compile_mode", args.compile_mode, "--kv_cache_dtype", args.kv_cache_dtype,
               "--compile_only"]
    return command + (["--top_k", str(args.top_k)] if args.top_k is not None else [])


def run(args):
    device = torch.device(args.device)
    check_device(device, DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    layout = tp.init(device, args.pipeline_stages)  # None unless torchrun started several processes
    if layout is not None:
        device = layout.device
        if args.interactive:
            raise UsageError("--interactive is not supported under torchrun (stdin is not shared); pass --prompt")
    shard = shard_for(layout) if layout is not None else None

    load_start = time.perf_counter()
    streaming_without_compile(args)
    model = load_model(args.checkpoint_path, device, DTYPES[args.dtype], shard=shard,
                       kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype], memory_budget=args.memory_budget)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    drafter = load_drafter(args, model, tokenizer, device, shard)
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - load_start:.2f} s", file=sys.stderr)
    stop_ids = () if args.ignore_eos else tokenizer.eos_ids

    if args.compile_only and not in_background_compile(args, device, layout, drafter):
        raise UsageError("--compile_only builds the CPU decode step of one process: use --device cpu, without torchrun")
    if args.interactive and args.max_seq_length is None:
        args.max_seq_length = 1024  # one cache size for every prompt: a compiled decode is not rebuilt per prompt
    # The plain CPU decode starts eager and takes the compiled step when the background has it (compiled_step.py);
    # drafting, CUDA graphs, torchrun's ranks and a compiled prefill compile before the first token.
    in_background = in_background_compile(args, device, layout, drafter)
    compiled = reported = False
    background = None
    # --interactive: the KV cache keeps what the last prompt and answer left, so the next prompt prefills only
    # what is new; with --chat the history is kept (a Conversation), /reset starts a new one, /exit ends.
    prompt_cache = PromptCache() if args.interactive else None
    conversation = Conversation(tokenizer, args.system) if args.interactive and args.chat else None
    for text in (sys.stdin if args.interactive else [args.prompt]):
        text = text.rstrip("\n")
        if args.interactive and not text.strip():
            continue
        if args.interactive and text.strip() in ("/exit", "/quit"):
            break
        if args.interactive and text.strip() == "/reset":
            if conversation is not None:
                conversation.reset()
            print("(the conversation is reset)", file=sys.stderr)
            continue
        try:
            if conversation is not None:
                room = args.max_seq_length - args.max_new_tokens - (drafter.slack if drafter is not None else 0)
                ids, dropped = conversation.prompt(text, room)
                if dropped:
                    print(f"(the conversation outgrew the KV cache of {args.max_seq_length} positions: dropped its "
                          f"{dropped} oldest turn{'s' if dropped > 1 else ''}; raise --max_seq_length to keep more)",
                          file=sys.stderr)
            else:
                ids = encode_prompt(tokenizer, text, args.chat, args.system)
        except ValueError as error:
            raise UsageError(str(error)) from None
        prompt, max_seq_length = prompt_tensor(args, ids, model, drafter, device, round_cache=in_background)
        if in_background and background is None:
            with torch.device(device):
                model.setup_caches(max_batch_size=args.batch_size, max_seq_length=max_seq_length)
            if args.compile_only:
                compiled_step.build_stages(model, args.checkpoint_path, args.batch_size, sampling_options(args),
                                           args.compile_mode, log=lambda line: print(line, file=sys.stderr))
                return
            background = compiled_step.BackgroundCompile(model, args.checkpoint_path, args.batch_size,
                                                         sampling_options(args), args.compile_mode,
                                                         build_command(args, max_seq_length)).start(load_in_thread=True)
        elif args.compile and not compiled:
            models = [model, *(drafter.models if drafter is not None else [])]
            compile_functions(models, device, args.compile_prefill, drafter, args.compile_mode)
            compile_start = time.perf_counter()
            generate(model, prompt, min(args.max_new_tokens, 4), batch_size=args.batch_size, max_seq_length=max_seq_length,
                     drafter=drafter, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
            print(f"Compilation time: {time.perf_counter() - compile_start:.2f} s", file=sys.stderr)
            compiled = True
        for sample_index in range(args.num_samples):
            profile = args.profile is not None and sample_index == args.num_samples - 1
            interrupted, answer = generate_and_print(args, model, tokenizer, prompt, max_seq_length, stop_ids, drafter,
                                                     layout, profile, background, prompt_cache)
            if interrupted:
                raise KeyboardInterrupt  # what was generated and the summary are printed: now exit 130
        if conversation is not None:
            conversation.answered(answer)
            if args.verbose and not reported:  # after the compile (or some of it), which makes the compiled choices
                reported = True
                print(kernel_paths_report([model, *(drafter.models if drafter is not None else [])], device),
                      file=sys.stderr)
    if background is not None:
        background.stop()  # what it finished is saved; the next run goes on from there
    if args.report_memory:
        report_memory(model, layout, device)


def main(argv=None):
    args = parse_args(argv)
    cli.run(lambda _: run(args), cleanup=tp.finish)


if __name__ == "__main__":
    main()
