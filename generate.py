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
from medusa import MedusaHeads, MedusaTree, load_medusa_heads, parse_tree, tree_attention_mask
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


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, **sampling):
    """The first new token, and the last position's final hidden state (what Medusa heads read)."""
    logits, hidden = model(x, input_pos, return_hidden=True)
    return sample(logits, **sampling)[0], hidden[:, -1]


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


def speculative_decode(model: Transformer, draft_model: Transformer, cur_token: Tensor, input_pos: int,
                       speculate_k: int, **sampling):
    """One step of speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batch 1.

    The draft proposes speculate_k tokens one by one; the target scores all of them (and the token before)
    in one forward of speculate_k + 1 positions. Returns the tokens this step produces, 1 to speculate_k + 1
    of them, and how many draft tokens were accepted. Cache entries written past the last kept token are
    left stale: the causal mask hides them until they are overwritten.
    """
    device = cur_token.device
    draft_tokens, draft_probs, token = [], [], cur_token
    for i in range(speculate_k):
        token, probs = decode_one_token(draft_model, token, torch.tensor([input_pos + i], device=device), **sampling)
        token = token.clone()
        draft_tokens.append(token)
        draft_probs.append(probs.clone())
    draft_tokens = torch.cat(draft_tokens, dim=1)  # [1, k]
    positions = torch.arange(input_pos, input_pos + speculate_k + 1, device=device)
    target_logits = verify(model, torch.cat([cur_token, draft_tokens], dim=1), positions)[0][0].float()  # [k + 1, vocab]
    draft_tokens = draft_tokens[0]

    if sampling.get("temperature", 0) <= 0:  # greedy: keep draft tokens while they are the target's argmax
        target_tokens = target_logits.argmax(dim=-1)
        accepted = int(torch.cumprod(draft_tokens == target_tokens[:-1], dim=0).sum())
        next_token = target_tokens[accepted]
    else:
        target_probs = logits_to_probs(target_logits, **sampling)
        draft_probs = torch.cat(draft_probs)  # [k, vocab]
        rows = torch.arange(speculate_k, device=device)
        p_target, p_draft = target_probs[rows, draft_tokens], draft_probs[rows, draft_tokens]
        # Accept draft token i with probability min(1, p_target / p_draft), stopping at the first rejection.
        keep = torch.rand(speculate_k, device=device) * p_draft < p_target
        accepted = int(torch.cumprod(keep, dim=0).sum())
        if accepted == speculate_k:  # all kept: a bonus token from the target's last position
            probs = target_probs[-1]
        else:  # the rejected token's mass goes back: sample from normalize(max(0, p_target - p_draft))
            probs = (target_probs[accepted] - draft_probs[accepted]).clamp(min=0)
            probs = probs / probs.sum()
        next_token = torch.multinomial(probs, 1)[0]
    if accepted == speculate_k:  # the draft never saw its own last token: give it one so its cache keeps up
        decode_one_token(draft_model, draft_tokens[-1].view(1, 1), positions[-1:], **sampling)
    return torch.cat([draft_tokens[:accepted], next_token.view(1)]), accepted


def verify(model: Transformer, tokens: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None,
           cache_pos: Optional[Tensor] = None):
    """The target's logits and hidden states for several drafted positions in one forward."""
    return model(tokens, input_pos, mask, cache_pos, return_hidden=True)


def propose(heads: MedusaHeads, hidden: Tensor) -> Tensor:
    """The heads' logits [num_heads, vocab] for one hidden state (as a row: DecodeLinear expects [.., rows, dim])."""
    return heads(hidden.view(1, -1))[0]


def typical_threshold(probs: Tensor, posterior_threshold: float, posterior_alpha: float) -> Tensor:
    """Medusa's typical acceptance: a token is plausible when its probability beats
    min(threshold, alpha * exp(-entropy)): strict where the target is sure, lenient where it is not."""
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    return torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))


def medusa_decode(model: Transformer, heads: MedusaHeads, tree: MedusaTree, cur_token: Tensor, head_logits: Tensor,
                  input_pos: int, typical: Optional[tuple] = None, temperature: float = 0.0):
    """One Medusa step, batch 1: build the candidate tree from the heads' top-k, verify it in one forward,
    keep the longest path the target accepts and move its K/V entries into place in the cache.

    head_logits [num_heads, vocab] are the heads' guesses for the tokens after cur_token. Greedy (typical
    None) accepts a candidate when it is the target's argmax; typical=(threshold, alpha) when it is
    plausible under the target at `temperature`. Returns the tokens produced, the number of tree tokens
    accepted, and the heads' guesses for the next step.
    """
    device = cur_token.device
    candidates = torch.cat([cur_token.view(1), head_logits.topk(tree.topk, dim=-1).indices.flatten()])
    tree_tokens = candidates[tree.token_indices]
    slots = input_pos + torch.arange(tree.size, device=device)
    mask = tree_attention_mask(tree, input_pos, model.max_seq_length)
    logits, hidden = verify(model, tree_tokens[None], input_pos + tree.depths, mask, slots)
    logits = logits[0].float()
    paths = tree.paths.clamp(min=0)
    path_tokens = tree_tokens[paths]  # [leaves, depth + 1], the root first
    parent_logits = logits[paths[:, :-1]]  # what the target predicts after each path node
    if typical is None:
        agree = parent_logits.argmax(dim=-1) == path_tokens[:, 1:]
    else:
        probs = torch.softmax(parent_logits / temperature, dim=-1)
        candidate_probs = probs.gather(-1, path_tokens[:, 1:, None])[..., 0]
        agree = candidate_probs > typical_threshold(probs, *typical)
    accept_lengths = torch.cumprod(agree & (tree.paths[:, 1:] >= 0), dim=1).sum(dim=1)
    accepted = int(accept_lengths.max())
    best = int(accept_lengths.argmax())
    if typical is not None and accepted > 0:  # among the longest paths, the one the target finds likeliest
        likelihood = candidate_probs[:, :accepted].log().sum(dim=1)
        best = int(torch.where(accept_lengths == accepted, likelihood, -float("inf")).argmax())
    nodes = paths[best, : accepted + 1]
    last_logits = logits[nodes[-1]]
    if typical is None:
        next_token = last_logits.argmax()
    else:
        probs = torch.softmax(last_logits / temperature, dim=-1)
        probs = probs.masked_fill(probs < typical_threshold(probs, *typical), 0)
        next_token = torch.multinomial(probs / probs.sum(), 1)[0]
    if accepted:  # the kept path's K/V go to the slots right after the prefix; the rest is stale, masked
        for layer in model.layers:
            layer.attention.kv_cache.move(slots[nodes], slots[: accepted + 1])
    next_head_logits = propose(heads, hidden[0, nodes[-1]])
    return torch.cat([path_tokens[best, 1 : accepted + 1], next_token.view(1)]), accepted, next_head_logits


def drafted_decode_n_tokens(step: Callable, cur_token: Tensor, input_pos: int, num_new_tokens: int, stop_ids: Tensor,
                            callback: Callable, accepted_counts: list) -> list:
    """Decode with a drafting step (speculative or Medusa) until num_new_tokens or a stop token, batch 1.
    step(cur_token, input_pos) -> (tokens produced, draft tokens accepted)."""
    new_tokens = []
    while len(new_tokens) < num_new_tokens:
        produced, accepted = step(cur_token, input_pos)
        accepted_counts.append(accepted)
        for token in produced[: num_new_tokens - len(new_tokens)].view(-1, 1, 1):
            new_tokens.append(token)
            callback(token)
            if torch.isin(token[0], stop_ids).item():
                return new_tokens
        input_pos += len(produced)
        cur_token = produced[-1].view(1, 1)
    return new_tokens


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, batch_size: int = 1,
             max_seq_length: Optional[int] = None, stop_ids=(), callback: Callable = lambda token: None,
             timings: Optional[dict] = None, draft_model: Optional[Transformer] = None, speculate_k: int = 5,
             medusa_heads: Optional[MedusaHeads] = None, medusa_tree: Optional[MedusaTree] = None,
             typical: Optional[tuple] = None, **sampling) -> Tensor:
    """Prompt [T] (repeated batch_size times) or [batch, T] -> [batch, T + generated].
    Rows that stopped early keep tokens past their stop; cut them with `until_stop`.
    With a draft model, speculative decoding (batch 1): the same tokens as without it when greedy,
    the same distribution when sampling. With Medusa heads and a tree (batch 1): the same tokens when
    greedy; typical=(threshold, alpha) for Medusa's typical acceptance when sampling.
    timings["accepted"] gets the drafted tokens accepted per step."""
    x = prompt if prompt.dim() == 2 else prompt.view(1, -1).repeat(batch_size, 1)
    batch_size, length = x.shape
    device = prompt.device
    if medusa_heads is not None and medusa_tree.depth > len(medusa_heads):
        raise ValueError(f"the tree is {medusa_tree.depth} deep but there are {len(medusa_heads)} Medusa heads")
    # Verification writes ahead of the last kept token: k + 1 slots, or a whole tree.
    slack = speculate_k + 1 if draft_model is not None else medusa_tree.size if medusa_heads is not None else 0
    max_seq_length = max_seq_length or length + max_new_tokens + slack
    max_new_tokens = min(max_new_tokens, max_seq_length - length - slack)
    with torch.device(device):
        for m in (model, draft_model) if draft_model is not None else (model,):
            m.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length)
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)

    start = time.perf_counter()
    prompt_pos = torch.arange(length, device=device)
    first, last_hidden = prefill(model, x, prompt_pos, **sampling)
    first = first.clone()
    if draft_model is not None:
        prefill(draft_model, x, prompt_pos, **sampling)  # only its cache is wanted
    callback(first)
    synchronize(device)
    prefill_done = time.perf_counter()
    tokens, accepted_counts = [first], []
    if max_new_tokens > 1 and not torch.isin(first[:, 0], stop_ids).all():
        if draft_model is not None:
            def step(cur_token, input_pos):
                return speculative_decode(model, draft_model, cur_token, input_pos, speculate_k, **sampling)
        elif medusa_heads is not None:
            head_logits = [propose(medusa_heads, last_hidden[0])]

            def step(cur_token, input_pos):
                produced, accepted, head_logits[0] = medusa_decode(
                    model, medusa_heads, medusa_tree, cur_token, head_logits[0], input_pos,
                    typical if sampling.get("temperature", 0) > 0 else None, sampling.get("temperature", 0))
                return produced, accepted
        if draft_model is None and medusa_heads is None:
            input_pos = torch.tensor([length], device=device, dtype=torch.long)
            tokens += decode_n_tokens(model, first, input_pos, max_new_tokens - 1, stop_ids, callback, **sampling)
        else:
            tokens += drafted_decode_n_tokens(step, first, length, max_new_tokens - 1, stop_ids, callback, accepted_counts)
    synchronize(device)
    if timings is not None:
        timings.update(prefill_s=prefill_done - start, decode_s=time.perf_counter() - prefill_done,
                       decode_tokens=len(tokens) - 1, accepted=accepted_counts)
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


EAGER_FUNCTIONS = {"decode_one_token": decode_one_token, "prefill": prefill, "verify": verify, "propose": propose}


def compile_functions(models, device, compile_prefill: bool = False):
    """Compile the decode step, the drafting verification (and optionally prefill) with settings chosen per
    device, by measurement. `models`: the model, or a list (target and draft).

    Rebinds this module's functions (as gpt-fast does), always from the eager originals."""
    global decode_one_token, prefill, verify, propose
    decode_one_token, prefill, verify, propose = (EAGER_FUNCTIONS[name] for name in EAGER_FUNCTIONS)
    if torch.device(device).type == "cuda":
        decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    else:
        import torch._inductor.config as inductor_config

        for module in (m for model in (models if isinstance(models, list) else [models]) for m in model.modules()):
            if type(module) is torch.nn.Linear:  # plain float linears only; quantized modules keep their kernels
                module.__class__ = DecodeLinear
            elif type(module) is Attention:
                module.__class__ = DecodeAttention
        # cpp_wrapper drops Python launch overhead between kernels. Freezing stays off: it would fold the
        # weights' float() into float32 copies and double the bytes read per token.
        inductor_config.cpp_wrapper = True
        decode_one_token = torch.compile(decode_one_token, fullgraph=True)
    verify = torch.compile(verify, fullgraph=True)  # a fixed number of positions: one static graph
    propose = torch.compile(propose, fullgraph=True)
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
    caches = ("kv_cache", "rope_", "causal_mask", "window_mask")
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
    rope_and_masks = {id(t) for name, t in model.named_buffers() if name.startswith(("rope_", "causal_mask", "window_mask"))}
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
    parser.add_argument("--draft_checkpoint_path", type=Path, default=None,
                        help="speculative decoding with this draft model (same tokenizer; e.g. an int4 copy of the target)")
    parser.add_argument("--speculate_k", type=int, default=5, help="draft tokens proposed per step")
    parser.add_argument("--medusa_checkpoint_path", type=Path, default=None,
                        help="Medusa heads: a folder with medusa_lm_head.safetensors|.pt and config.json (FasterDecoding layout)")
    parser.add_argument("--medusa_choices", default="chain2", help="candidate tree: a name (chain1, chain2, chain3, "
                        "tree4, tree8, mc_sim_7b_63) or a file with a list of paths such as [[0], [1], [0, 0]]")
    parser.add_argument("--medusa_sampling", choices=["greedy", "typical"], default="greedy",
                        help="with --temperature > 0, typical acceptance (Medusa's) instead of greedy verification")
    parser.add_argument("--posterior_threshold", type=float, default=0.09, help="typical acceptance: probability cap")
    parser.add_argument("--posterior_alpha", type=float, default=0.3, help="typical acceptance: entropy factor")
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
        (args.speculate_k < 1, "--speculate_k must be at least 1"),
        ((args.draft_checkpoint_path or args.medusa_checkpoint_path) is not None and args.batch_size != 1,
         "drafting runs one sequence at a time: use --batch_size 1 with --draft_checkpoint_path or --medusa_checkpoint_path"),
        (args.draft_checkpoint_path is not None and args.medusa_checkpoint_path is not None,
         "give --draft_checkpoint_path or --medusa_checkpoint_path, not both"),
        (args.medusa_sampling == "typical" and args.temperature == 0,
         "--medusa_sampling typical needs --temperature > 0 (at 0 Medusa verifies greedily)"),
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


def load_tokenizer(directory: Path) -> Tokenizer:
    try:
        return Tokenizer(directory)
    except FileNotFoundError:
        raise
    except Exception as error:  # tokenizers/sentencepiece raise bare exceptions on a corrupt file
        raise UsageError(f"cannot read the tokenizer in {directory} ({error}); convert the checkpoint again")


def check_same_tokenizer(model: Transformer, tokenizer: Tokenizer, draft_model: Transformer, draft_path: Path):
    """Drafting compares token ids, so the draft must share the target's vocabulary exactly."""
    draft_tokenizer = load_tokenizer(draft_path.parent)
    probe = "The quick brown fox, 1234 ünïcødé <|im_end|> 東京\n  def f(x): return x"
    differences = [what for what, ours, theirs in [
        ("vocabulary size", model.args.vocab_size, draft_model.args.vocab_size),
        ("tokenizer size", tokenizer.vocab_size, draft_tokenizer.vocab_size),
        ("EOS ids", tokenizer.eos_ids, draft_tokenizer.eos_ids),
        ("encoding of a probe text", tokenizer.encode(probe), draft_tokenizer.encode(probe)),
    ] if ours != theirs]
    if differences:
        raise UsageError(f"the draft {draft_path} does not share the target's tokenizer ({', '.join(differences)} differ); "
                         "use a draft from the same model family, e.g. an int8/int4 copy of the target made by quantize.py")


def acceptance_summary(accepted_counts: list, depth: int) -> str:
    steps = max(len(accepted_counts), 1)
    counts = torch.tensor(accepted_counts, dtype=torch.float)
    per_position = [(counts > i).sum().item() / steps for i in range(depth)]
    return (f"Acceptance: {(counts + 1).mean().item():.2f} tokens per target forward over {len(accepted_counts)} steps; "
            "drafted position accepted: " + " ".join(f"{rate:.2f}" for rate in per_position))


def run(args):
    if args.medusa_checkpoint_path is not None and not args.medusa_checkpoint_path.exists():
        raise UsageError(f"Medusa heads {args.medusa_checkpoint_path} not found; train them with scripts/train_medusa.py")
    for path in (args.checkpoint_path, args.draft_checkpoint_path):
        if path is not None and not path.is_file():
            raise UsageError(f"checkpoint {path} not found; create it with scripts/prepare.sh or convert_hf_checkpoint.py")
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
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    draft_model = None
    if args.draft_checkpoint_path is not None:  # sharded the same way as the target under torchrun
        draft_model = load_model(args.draft_checkpoint_path, device, DTYPES[args.dtype], shard=layout and layout.shard)
        check_same_tokenizer(model, tokenizer, draft_model, args.draft_checkpoint_path)
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - load_start:.2f} s", file=sys.stderr)
    stop_ids = () if args.ignore_eos else tokenizer.eos_ids
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if draft_model is not None:
        sampling.update(draft_model=draft_model, speculate_k=args.speculate_k)
    medusa_heads = None
    if args.medusa_checkpoint_path is not None:
        try:
            tree = parse_tree(args.medusa_choices).to(device)
        except ValueError as error:
            raise UsageError(str(error))
        medusa_heads = load_medusa_heads(args.medusa_checkpoint_path, model.args, model.output).to(device=device, dtype=DTYPES[args.dtype])
        if tree.depth > len(medusa_heads):
            raise UsageError(f"tree {args.medusa_choices} is {tree.depth} deep but {args.medusa_checkpoint_path} has "
                             f"{len(medusa_heads)} heads; pick a shallower tree")
        typical = (args.posterior_threshold, args.posterior_alpha) if args.medusa_sampling == "typical" else None
        sampling.update(medusa_heads=medusa_heads, medusa_tree=tree, typical=typical)

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
        slack = args.speculate_k + 1 if draft_model is not None else sampling["medusa_tree"].size if medusa_heads is not None else 0
        max_seq_length = args.max_seq_length or len(ids) + args.max_new_tokens + slack
        if len(ids) + slack >= max_seq_length:
            raise UsageError(f"the prompt is {len(ids)} tokens but the KV cache holds {max_seq_length}; raise --max_seq_length or shorten the prompt")
        prompt = torch.tensor(ids, dtype=torch.long, device=device)
        if args.compile and not compiled:
            compile_functions([m for m in (model, draft_model, medusa_heads) if m is not None], device, args.compile_prefill)
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
            if draft_model is not None or medusa_heads is not None:
                depth = args.speculate_k if draft_model is not None else sampling["medusa_tree"].depth
                print(acceptance_summary(timings["accepted"], depth), file=sys.stderr)
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
