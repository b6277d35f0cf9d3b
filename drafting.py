"""Drafting strategies: cheap guesses of the next few tokens that the target checks in one forward.

    SpeculativeDrafter(draft_model, k)   a smaller model proposes k tokens (Leviathan et al. 2023; Chen et al. 2023)
    MedusaDrafter(heads, tree)           extra heads on the target propose a tree of candidates (Cai et al. 2024)

generate.generate(model, prompt, n, drafter=...) runs either through `drafted_decode_n_tokens`. Each step
returns the tokens it produced (1 + the accepted drafts) and how many drafts were accepted. Greedy, both give
exactly plain greedy decoding's tokens; sampling, speculative decoding draws from exactly the target's
distribution (Medusa's typical acceptance is its own approximation). Verification is the model's one forward
with several positions, and a tree mask for Medusa: no attention code of its own. Batch 1.
"""
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from cli import UsageError
from medusa import MedusaHeads, MedusaTree, tree_attention_mask
from model import Transformer
from sampling import decode_one_token, logits_to_probs
from tokenizer import Tokenizer, load_tokenizer


def verify(model: Transformer, tokens: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None,
           cache_pos: Optional[Tensor] = None):
    """The target's logits and hidden states for several drafted positions in one forward."""
    return model(tokens, input_pos, mask, cache_pos, return_hidden=True)


def propose(heads: MedusaHeads, hidden: Tensor) -> Tensor:
    """The heads' logits [num_heads, vocab] for one hidden state (as a row: DecodeLinear expects [.., rows, dim])."""
    return heads(hidden.view(1, -1))[0]


draft_one_token = decode_one_token  # rebound to compiled versions by compile_drafting, as generate.py does
EAGER_FUNCTIONS = {"draft_one_token": decode_one_token, "verify": verify, "propose": propose}


def compile_drafting(mode: Optional[str] = None):
    """Compile the draft's decode step, verification (a fixed number of positions: one static graph) and the
    Medusa heads' proposal. Always from the eager originals, so that compiling twice does not nest."""
    global draft_one_token, verify, propose
    draft_one_token = torch.compile(EAGER_FUNCTIONS["draft_one_token"], mode=mode, fullgraph=True)
    verify = torch.compile(EAGER_FUNCTIONS["verify"], fullgraph=True)
    propose = torch.compile(EAGER_FUNCTIONS["propose"], fullgraph=True)


def use_eager_drafting():
    global draft_one_token, verify, propose
    draft_one_token, verify, propose = EAGER_FUNCTIONS.values()


# ---------------------------------------------------------------- speculative decoding


def speculative_decode(model: Transformer, draft_model: Transformer, cur_token: Tensor, input_pos: int,
                       speculate_k: int, **sampling):
    """One step of speculative decoding, batch 1.

    The draft proposes speculate_k tokens one by one; the target scores all of them (and the token before)
    in one forward of speculate_k + 1 positions. Returns the tokens this step produces, 1 to speculate_k + 1
    of them, and how many draft tokens were accepted. Cache entries written past the last kept token are
    left stale: the causal mask hides them until they are overwritten.
    """
    device = cur_token.device
    draft_tokens, draft_probs, token = [], [], cur_token
    for i in range(speculate_k):
        token, probs = draft_one_token(draft_model, token, torch.tensor([input_pos + i], device=device), **sampling)
        token = token.clone()  # CUDA graphs reuse their output buffers
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
        draft_one_token(draft_model, draft_tokens[-1].view(1, 1), positions[-1:], **sampling)
    return torch.cat([draft_tokens[:accepted], next_token.view(1)]), accepted


class SpeculativeDrafter:
    """A draft model (same tokenizer, e.g. an int8/int4 copy of the target) proposing speculate_k tokens a step."""

    def __init__(self, draft_model: Transformer, speculate_k: int = 5):
        self.draft_model, self.speculate_k = draft_model, speculate_k
        self.depth = speculate_k  # drafted positions per step
        self.slack = speculate_k + 1  # cache slots written past the last kept token
        self.models = [draft_model]  # they need caches (and decode kernels under compile)

    def start(self, prompt: Tensor, prompt_pos: Tensor, last_hidden: Tensor):
        self.draft_model(prompt, prompt_pos)  # only the draft's cache is wanted

    def step(self, model: Transformer, cur_token: Tensor, input_pos: int, **sampling):
        return speculative_decode(model, self.draft_model, cur_token, input_pos, self.speculate_k, **sampling)


def check_same_tokenizer(tokenizer: Tokenizer, model: Transformer, draft_model: Transformer, draft_path: Path):
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


# ---------------------------------------------------------------- Medusa


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


class MedusaDrafter:
    """Medusa heads proposing a tree of candidates from the target's own last hidden state. `typical`
    (threshold, alpha) selects typical acceptance when sampling; greedy verification otherwise."""

    def __init__(self, heads: MedusaHeads, tree: MedusaTree, typical: Optional[tuple] = None):
        if tree.depth > len(heads):
            raise UsageError(f"the tree is {tree.depth} deep but there are {len(heads)} Medusa heads; pick a shallower tree")
        self.heads, self.tree, self.typical = heads, tree, typical
        self.depth, self.slack = tree.depth, tree.size
        self.models = [heads]
        self.head_logits = None

    def start(self, prompt: Tensor, prompt_pos: Tensor, last_hidden: Tensor):
        self.head_logits = propose(self.heads, last_hidden[0])

    def step(self, model: Transformer, cur_token: Tensor, input_pos: int, temperature: float = 0.0, **sampling):
        typical = self.typical if temperature > 0 else None
        produced, accepted, self.head_logits = medusa_decode(model, self.heads, self.tree, cur_token, self.head_logits,
                                                             input_pos, typical, temperature)
        return produced, accepted


# ---------------------------------------------------------------- the drafted loop


def drafted_decode_n_tokens(model: Transformer, drafter, cur_token: Tensor, input_pos: int, num_new_tokens: int,
                            stop_ids: Tensor, callback: Callable, new_tokens: list, accepted_counts: list, **sampling):
    """Append to new_tokens, one drafting step at a time, until num_new_tokens or a stop token (batch 1)."""
    goal = len(new_tokens) + num_new_tokens
    while len(new_tokens) < goal:
        produced, accepted = drafter.step(model, cur_token, input_pos, **sampling)
        accepted_counts.append(accepted)
        for token in produced[: goal - len(new_tokens)].view(-1, 1, 1):
            new_tokens.append(token)
            callback(token)
            if torch.isin(token[0], stop_ids).item():
                return
        input_pos += len(produced)
        cur_token = produced[-1].view(1, 1)


def acceptance_summary(accepted_counts: list, depth: int) -> str:
    steps = max(len(accepted_counts), 1)
    counts = torch.tensor(accepted_counts, dtype=torch.float)
    per_position = [(counts > i).sum().item() / steps for i in range(depth)]
    return (f"Acceptance: {(counts + 1).mean().item():.2f} tokens per target forward over {len(accepted_counts)} steps; "
            "drafted position accepted: " + " ".join(f"{rate:.2f}" for rate in per_position))
