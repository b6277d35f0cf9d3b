"""Drafting strategies: cheap guesses of the next few tokens that the target checks in one forward.

    PromptLookupDrafter(k)               the tokens that followed an earlier occurrence of the last few tokens
                                         (HF transformers' prompt_lookup_num_tokens; no draft model)
    SpeculativeDrafter(draft_model, k)   a smaller model proposes k tokens (Leviathan et al. 2023; Chen et al. 2023)
    MedusaDrafter(heads, tree)           extra heads on the target propose a tree of candidates (Cai et al. 2024)

generate.generate(model, prompt, n, drafter=...) runs each through `drafted_decode_n_tokens`. Each step
returns the tokens it produced (1 + the accepted drafts) and how many drafts were accepted. Greedy, all give
exactly plain greedy decoding's tokens; sampling, prompt lookup and speculative decoding draw from exactly the
target's distribution (Medusa's typical acceptance is its own approximation). Verification is the model's one
forward with several positions, and a tree mask for Medusa: no attention code of its own. Batch 1.

Prompt lookup and speculative decoding adapt their draft length as they go (DraftLength): longer after steps
whose drafts were all accepted, shorter after rejections, and no drafting at all for a while when drafted steps
cost more time per produced token than plain ones, measured as they run.
"""
import time
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


def verify_drafts(model: Transformer, cur_token: Tensor, draft_tokens: Tensor, input_pos: int, width: int) -> Tensor:
    """The target's logits [n + 1, vocab] after cur_token and after each of the n draft tokens [n], from one forward
    padded to `width` positions: a compiled verification then has one shape whatever n is (each new shape costs a
    compile of minutes on a small CPU). The padding's logits are dropped; the cache slots it writes lie past the
    kept tokens, where the causal mask hides them until they are overwritten."""
    tokens = torch.cat([cur_token.view(1), draft_tokens])
    n = len(tokens)
    tokens = torch.cat([tokens, tokens.new_zeros(width - n)])
    positions = torch.arange(input_pos, input_pos + width, device=tokens.device)
    return verify(model, tokens[None], positions)[0][0, :n].float()


def propose(heads: MedusaHeads, hidden: Tensor) -> Tensor:
    """The heads' logits [num_heads, vocab] for one hidden state (as a row: DecodeLinear expects [.., rows, dim])."""
    return heads(hidden.view(1, -1))[0]


EAGER_FUNCTIONS = {"verify": verify, "propose": propose}


def compile_drafting():
    """Compile verification (one graph: drafts are padded to the drafter's full width) and the Medusa heads'
    proposal. Always from the eager originals, so that compiling twice does not nest. One-token steps
    (the draft model's, plain steps between drafts) use the decode step generate.py compiled."""
    global verify, propose
    verify = torch.compile(EAGER_FUNCTIONS["verify"], fullgraph=True, dynamic=False)
    propose = torch.compile(EAGER_FUNCTIONS["propose"], fullgraph=True, dynamic=False)


def use_eager_drafting():
    global verify, propose
    verify, propose = EAGER_FUNCTIONS.values()


def accept_drafts(target_logits: Tensor, draft_tokens: Tensor, draft_probs: Optional[Tensor] = None, **sampling):
    """How many of draft_tokens [k] the target keeps, given its logits [k + 1, vocab] after the token before
    them and after each, and the next token: a correction at the first rejection, or a bonus token.

    Greedy keeps drafts while they are the target's argmax. Sampling keeps draft i with probability
    min(1, p_target / p_draft) and, at the first rejection, samples normalize(max(0, p_target - p_draft)):
    exactly the target's distribution. draft_probs [k, vocab] is None for drafts that were certain (prompt
    lookup): p_draft = 1 at the drafted token."""
    k = len(draft_tokens)
    if sampling.get("temperature", 0) <= 0:
        target_tokens = target_logits.argmax(dim=-1)
        accepted = int(torch.cumprod(draft_tokens == target_tokens[:-1], dim=0).sum())
        return accepted, target_tokens[accepted]
    target_probs = logits_to_probs(target_logits, **sampling)
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(draft_tokens, target_probs.shape[-1]).to(target_probs.dtype)
    rows = torch.arange(k, device=draft_tokens.device)
    p_target, p_draft = target_probs[rows, draft_tokens], draft_probs[rows, draft_tokens]
    keep = torch.rand(k, device=draft_tokens.device) * p_draft < p_target
    accepted = int(torch.cumprod(keep, dim=0).sum())
    if accepted == k:  # all kept: a bonus token from the target's last position
        probs = target_probs[-1]
    else:  # the rejected token's mass goes back
        probs = (target_probs[accepted] - draft_probs[accepted]).clamp(min=0)
        probs = probs / probs.sum()
    return accepted, torch.multinomial(probs, 1)[0]


def plain_step(model: Transformer, cur_token: Tensor, input_pos: int, decode_one: Callable, **sampling):
    """One ordinary decode step, for when drafting does not pay: (the token, 0 accepted, 0 drafted)."""
    token, _ = decode_one(model, cur_token, torch.tensor([input_pos], device=cur_token.device), **sampling)
    return token.clone().view(1), 0, 0


class DraftLength:
    """How many tokens to draft in the next step, learnt as a drafter runs (kept across its generations).

    After a step whose drafts were all accepted, two more (up to `maximum`); after a rejection, one fewer (at
    least 1): HF transformers' "heuristic" schedule. And whether drafting pays at all: the time of drafted and
    of plain steps and the tokens a drafted step yields are tracked (moving averages). When drafted steps yield
    fewer tokens per second than plain ones, the next `pause` steps are plain, and the pause doubles each time
    drafting fails again (so probing costs a few steps per generation at most); when a drafted step costs more
    than `maximum` + 1 plain steps, no draft can ever pay it back and this drafter stops drafting for good. The
    first steps are plain, to time the baseline. The first step of each kind is not timed: under --compile it
    includes compiling its graph (minutes for a verification), which would stop drafting for good.
    Fixed (adaptive=False): always `maximum`."""

    def __init__(self, maximum: int, adaptive: bool = True, pause: int = 16, baseline_steps: int = 2):
        self.maximum, self.adaptive, self.first_pause = maximum, adaptive, pause
        self.length, self.pause, self.never_pays = maximum, pause, False
        self.plain_left = baseline_steps if adaptive else 0
        self.step_seconds = {True: None, False: None}  # drafted, plain
        self.drafted_tokens = None
        self.untimed = {True: True, False: True}  # the first step of each kind: may include a compile

    def next(self) -> int:
        return 0 if self.plain_left > 0 or self.never_pays else self.length

    def plain_run(self) -> int:
        """Plain steps to take in a row from here (the plain decode loop can take them: no drafted loop's work
        a token): the rest of a pause, all of them (a large number) once drafting never pays; 0 while each step
        is its own (a drafted one, or the first plain one, which is not timed)."""
        if not self.adaptive or self.untimed[False]:
            return 0
        return 1 << 30 if self.never_pays else self.plain_left

    def plain_ran(self, steps: int, seconds: float):
        """`steps` plain steps taken in a row in `seconds`."""
        self.step_seconds[False] = self.average(self.step_seconds[False], seconds / steps)
        self.plain_left = max(self.plain_left - steps, 0)

    @staticmethod
    def average(previous, value):
        return value if previous is None else 0.7 * previous + 0.3 * value

    def update(self, drafted: int, accepted: int, produced: int, seconds: float):
        if not self.adaptive:
            return
        key = drafted > 0
        timed, self.untimed[key] = not self.untimed[key], False
        if timed:
            self.step_seconds[key] = self.average(self.step_seconds[key], seconds)
        if not key:
            self.plain_left = max(self.plain_left - 1, 0)
            return
        self.length = min(self.length + 2, self.maximum) if accepted == drafted else max(self.length - 1, 1)
        if not timed:
            return
        self.drafted_tokens = self.average(self.drafted_tokens, produced)
        plain = self.step_seconds[False]
        if plain is None:
            return
        if self.step_seconds[True] > (self.maximum + 1) * plain:
            self.never_pays = True
        elif self.drafted_tokens / self.step_seconds[True] < 1 / plain:
            self.plain_left, self.pause = self.pause, min(2 * self.pause, 1024)
            self.step_seconds[True], self.drafted_tokens = None, None  # judged afresh when drafting resumes
        else:
            self.pause = self.first_pause


# ---------------------------------------------------------------- speculative decoding


def speculative_decode(model: Transformer, draft_model: Transformer, cur_token: Tensor, input_pos: int,
                       speculate_k: int, decode_one: Callable = decode_one_token, width: Optional[int] = None,
                       **sampling):
    """One step of speculative decoding, batch 1. decode_one is the one-token step (generate's compiled one);
    verification is padded to `width` positions (default speculate_k + 1).

    The draft proposes speculate_k tokens one by one; the target scores all of them (and the token before)
    in one forward of speculate_k + 1 positions. Returns the tokens this step produces, 1 to speculate_k + 1
    of them, and how many draft tokens were accepted. Cache entries written past the last kept token are
    left stale: the causal mask hides them until they are overwritten.
    """
    device = cur_token.device
    draft_tokens, draft_probs, token = [], [], cur_token
    for i in range(speculate_k):
        token, probs = decode_one(draft_model, token, torch.tensor([input_pos + i], device=device), **sampling)
        token = token.clone()  # CUDA graphs reuse their output buffers
        draft_tokens.append(token)
        draft_probs.append(probs.clone())
    draft_tokens = torch.cat(draft_tokens, dim=1)[0]  # [k]
    target_logits = verify_drafts(model, cur_token, draft_tokens, input_pos, width or speculate_k + 1)
    accepted, next_token = accept_drafts(target_logits, draft_tokens, torch.cat(draft_probs), **sampling)
    if accepted == speculate_k:  # the draft never saw its own last token: give it one so its cache keeps up
        decode_one(draft_model, draft_tokens[-1].view(1, 1), torch.tensor([input_pos + speculate_k], device=device),
                   **sampling)
    return torch.cat([draft_tokens[:accepted], next_token.view(1)]), accepted


class SpeculativeDrafter:
    """A draft model (same tokenizer, e.g. an int8/int4 copy of the target) proposing up to speculate_k tokens a
    step (a fixed speculate_k with adaptive=False)."""

    def __init__(self, draft_model: Transformer, speculate_k: int = 5, adaptive: bool = True):
        self.draft_model, self.speculate_k, self.adaptive = draft_model, speculate_k, adaptive
        self.depth = speculate_k  # drafted positions per step, at most
        self.slack = speculate_k + 1  # cache slots written past the last kept token
        self.models = [draft_model]  # they need caches (and decode kernels under compile)
        self.length = DraftLength(speculate_k, adaptive)  # what it learns carries over to the next generation

    def start(self, prompt: Tensor, prompt_pos: Tensor, last_hidden: Tensor):
        self.draft_model(prompt, prompt_pos)  # only the draft's cache is wanted
        self.missed, self.missed_from = [], None  # tokens of plain steps, which the draft has not seen yet

    def decoded_plainly(self, tokens: Tensor, input_pos: int):
        """The target took `tokens` [n] (the first at input_pos) without drafting: the draft's cache is missing them."""
        self.missed_from = input_pos if not self.missed else self.missed_from
        self.missed.append(tokens.view(-1))

    def step(self, model: Transformer, cur_token: Tensor, input_pos: int, decode_one: Callable, drafts: int, **sampling):
        if drafts == 0:
            self.decoded_plainly(cur_token, input_pos)
            return plain_step(model, cur_token, input_pos, decode_one, **sampling)
        if self.missed:  # plain steps' tokens (consecutive positions) go into the draft's cache in one forward
            missed = torch.cat(self.missed)
            self.draft_model(missed.view(1, -1), torch.arange(self.missed_from, input_pos, device=missed.device))
            self.missed = []
        produced, accepted = speculative_decode(model, self.draft_model, cur_token, input_pos, drafts, decode_one,
                                                self.slack, **sampling)
        return produced, accepted, drafts


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


# ---------------------------------------------------------------- prompt lookup


class NgramIndex:
    """Where each n-gram (n = min_ngram..max_ngram) of a growing token list last occurred with a token after it,
    so that the continuation of the list's own ending is found in O(max_ngram) per token, whatever the length."""

    def __init__(self, max_ngram: int, min_ngram: int = 1):
        self.max_ngram, self.min_ngram, self.tokens, self.last_start = max_ngram, min_ngram, [], {}

    def extend(self, tokens: list):
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before this token now have a continuation
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.last_start[tuple(self.tokens[end - n:end])] = end - n
            self.tokens.append(token)

    def continuation(self, num_tokens: int) -> list:
        """Up to num_tokens tokens that followed the latest earlier occurrence of the longest ending n-gram."""
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            start = self.last_start.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start + n:start + n + num_tokens]
        return []


class PromptLookupDrafter:
    """Drafts copied from the text itself: the tokens that followed the latest earlier occurrence of the last
    max_ngram (or fewer) tokens, as HF transformers' prompt lookup decoding. No draft model: a draft costs only
    its share of the verification forward, so it pays where the output repeats the input (rewriting,
    summarising, editing code). Without a match the step is a plain one.

    A match must be at least min_ngram tokens long. One token says little about what follows it: on
    scripts/bench.py's prompts, matching single tokens too drafted more and kept less (tokens per target
    forward 1.01 against 1.17 on the open prompt, 1.44 against 1.51 on the grounded one, with min_ngram 1
    and 2), and a rejected draft costs a whole verification (about two tokens' time on CPU)."""

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3, adaptive: bool = True, min_ngram: int = 2):
        self.num_tokens, self.max_ngram, self.min_ngram, self.adaptive = num_tokens, max(max_ngram, min_ngram), min_ngram, adaptive
        self.depth, self.slack, self.models = num_tokens, num_tokens + 1, []
        self.length = DraftLength(num_tokens, adaptive)  # what it learns carries over to the next generation

    def start(self, prompt: Tensor, prompt_pos: Tensor, last_hidden: Tensor):
        self.index = NgramIndex(self.max_ngram, self.min_ngram)
        self.index.extend(prompt[0].tolist())

    def decoded_plainly(self, tokens: Tensor, input_pos: int):
        """The target took `tokens` [n] without drafting: they are text to match, as each step's token is."""
        self.index.extend(tokens.view(-1).tolist())

    def step(self, model: Transformer, cur_token: Tensor, input_pos: int, decode_one: Callable, drafts: int, **sampling):
        self.index.extend([int(cur_token)])
        guess = self.index.continuation(drafts) if drafts else []
        if not guess:
            produced, accepted, _ = plain_step(model, cur_token, input_pos, decode_one, **sampling)
        else:
            draft_tokens = torch.tensor(guess, dtype=torch.long, device=cur_token.device)
            target_logits = verify_drafts(model, cur_token, draft_tokens, input_pos, self.slack)
            accepted, next_token = accept_drafts(target_logits, draft_tokens, None, **sampling)
            produced = torch.cat([draft_tokens[:accepted], next_token.view(1)])
        self.index.extend(produced[:-1].tolist())  # the last one comes back as the next cur_token
        return produced, accepted, len(guess)


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
        self.length = DraftLength(tree.depth, adaptive=False)  # the tree is one compiled shape: always all of it

    def start(self, prompt: Tensor, prompt_pos: Tensor, last_hidden: Tensor):
        self.tree = self.tree.to(last_hidden.device)  # built on the CPU (parse_tree); verified where the model is
        self.head_logits = propose(self.heads, last_hidden[0])

    def step(self, model: Transformer, cur_token: Tensor, input_pos: int, decode_one: Callable, drafts: int,
             temperature: float = 0.0, **sampling):
        typical = self.typical if temperature > 0 else None
        produced, accepted, self.head_logits = medusa_decode(model, self.heads, self.tree, cur_token, self.head_logits,
                                                             input_pos, typical, temperature)
        return produced, accepted, self.tree.depth


# ---------------------------------------------------------------- the drafted loop


def drafted_decode_n_tokens(model: Transformer, drafter, cur_token: Tensor, input_pos: int, num_new_tokens: int,
                            stop_ids: Tensor, callback: Callable, new_tokens: list, accepted_counts: list,
                            decode_one: Callable = decode_one_token, plain_decode: Optional[Callable] = None,
                            **sampling):
    """Append to new_tokens, one drafting step at a time, until num_new_tokens or a stop token (batch 1).
    The drafter's DraftLength says how many tokens each step may draft (0: a plain step with decode_one); a step
    returns the tokens produced, the drafts accepted and the number it drafted (0 when it found none).
    plain_decode(cur_token, input_pos, n, new_tokens), where given (generate's plain loop), takes the runs of
    plain steps the DraftLength asks for (a pause, or the rest once drafting never pays): on a prompt where
    nothing drafted is accepted, the drafted loop then costs what plain decoding does."""
    goal = len(new_tokens) + num_new_tokens
    can_stop = stop_ids.numel() > 0  # as decode_n_tokens: no check (a device sync a token) without stop ids
    while len(new_tokens) < goal:
        run = min(drafter.length.plain_run(), goal - len(new_tokens)) if plain_decode is not None else 0
        if run > 1:
            before, start = len(new_tokens), time.perf_counter()
            plain_decode(cur_token, input_pos, run, new_tokens)
            produced = torch.cat(new_tokens[before:]).view(-1)
            drafter.length.plain_ran(len(produced), time.perf_counter() - start)
            drafter.decoded_plainly(torch.cat([cur_token.view(-1), produced[:-1]]), input_pos)
            accepted_counts.extend([0] * len(produced))
            if can_stop and torch.isin(produced[-1], stop_ids).item():
                return
            input_pos += len(produced)
            cur_token = produced[-1].view(1, 1)
            continue
        drafts = drafter.length.next()
        start = time.perf_counter()
        produced, accepted, drafted = drafter.step(model, cur_token, input_pos, decode_one, drafts, **sampling)
        drafter.length.update(drafted, accepted, len(produced), time.perf_counter() - start)
        accepted_counts.append(accepted)
        for token in produced[: goal - len(new_tokens)].view(-1, 1, 1):
            new_tokens.append(token)
            callback(token)
            if can_stop and torch.isin(token[0], stop_ids).item():
                return
        input_pos += len(produced)
        cur_token = produced[-1].view(1, 1)


def acceptance_summary(accepted_counts: list, depth: int) -> str:
    steps = max(len(accepted_counts), 1)
    counts = torch.tensor(accepted_counts, dtype=torch.float)
    per_position = [(counts > i).sum().item() / steps for i in range(depth)]
    return (f"Acceptance: {(counts + 1).mean().item():.2f} tokens per target forward over {len(accepted_counts)} steps; "
            "drafted position accepted: " + " ".join(f"{rate:.2f}" for rate in per_position))
