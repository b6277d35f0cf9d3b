"""Drafting: speculative decoding and Medusa must give exactly plain greedy decoding's tokens (float32), and
speculative sampling must draw from exactly the target's distribution."""
import shutil

import pytest
import torch

from checkpoint import CheckpointError
from conftest import build_hf_model, family_configs
from convert_hf_checkpoint import convert
from drafting import (DraftLength, MedusaDrafter, NgramIndex, PromptLookupDrafter, SpeculativeDrafter, accept_drafts,
                      medusa_decode, speculative_decode)
from generate import generate as generate_tokens, load_model
from medusa import MedusaHeads, build_tree, load_medusa_heads, parse_tree, tree_attention_mask
from quantize import quantize_checkpoint
from sampling import logits_to_probs
from test_generate import main_exit, run_cli


def different_draft(family, tmp_path):
    """Same shape and vocabulary as the tiny target, other random weights: most proposals get rejected."""
    folder = tmp_path / f"{family}-draft"
    build_hf_model(family_configs()[family], seed=1).save_pretrained(folder)
    return load_model(convert(checkpoint_dir=folder), "cpu", torch.float32)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_speculative_equals_greedy(family, tiny_models, tmp_path):
    _, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0))
    plain = generate_tokens(model, prompt, 40)
    drafts = {"int4": load_model(quantize_checkpoint(checkpoint, "int4", 32), "cpu", torch.float32),
              "other weights": different_draft(family, tmp_path)}
    acceptance = {}
    for name, draft in drafts.items():
        for k in (1, 4):
            timings = {}
            drafted = generate_tokens(model, prompt, 40, drafter=SpeculativeDrafter(draft, k, adaptive=False), timings=timings)
            assert torch.equal(drafted, plain), (name, k)
            acceptance[name, k] = sum(timings["accepted"]) / len(timings["accepted"])
    # Both branches really ran: the int4 copy agrees often (bonus tokens), the stranger rarely (rejections).
    assert acceptance["int4", 4] > 2 and acceptance["other weights", 4] < 1


def first_two_tokens(model, draft, prefix, cur_token, samples, speculate_k, **sampling):
    """Histograms of the first and second token that speculative steps produce from one fixed state."""
    first, second = torch.zeros(256), torch.zeros(256)
    input_pos = prefix.shape[1]
    for _ in range(samples):
        produced, _ = speculative_decode(model, draft, cur_token, input_pos, speculate_k, **sampling)
        first[produced[0]] += 1
        if len(produced) > 1:
            second[produced[1]] += 1
        else:  # only a replacement token came out: draw the next one as plain decoding would
            logits = model(produced.view(1, 1), torch.tensor([input_pos + 1]))
            second[torch.multinomial(logits_to_probs(logits[0, -1], **sampling), 1)] += 1
    return first / samples, second / samples


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_speculative_sampling_matches_the_target_distribution(tiny_models, tmp_path, monkeypatch):
    """Over many draws from one state, the produced tokens follow the target's own distribution, not the
    draft's; and wrong accept rules (always accept; accept only where p_target > p_draft, with no coin) are
    caught by the same check."""
    torch.manual_seed(0)
    _, _, checkpoint = tiny_models["qwen2"]
    model = load_model(checkpoint, "cpu", torch.float32)
    draft = load_model(checkpoint, "cpu", torch.float32)
    with torch.no_grad():  # a related but clearly different draft: the same top tokens, much sharper
        draft.output.weight.mul_(4.0)
    sampling = dict(temperature=1.0, top_k=6)
    prefix = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    for m in (model, draft):
        m.setup_caches(1, 32)
    with torch.no_grad():
        model(prefix, torch.arange(10))
        draft(prefix, torch.arange(10))
        cur_token = torch.tensor([[7]])
        # Exact target distributions: next token, and the token after it (summed over the next token).
        target_first = logits_to_probs(model(cur_token, torch.tensor([10]))[0, -1], **sampling)
        draft_first = logits_to_probs(draft(cur_token, torch.tensor([10]))[0, -1], **sampling)
        target_second = torch.zeros(256)
        for token in target_first.nonzero()[:, 0]:
            logits = model(token.view(1, 1), torch.tensor([11]))
            target_second += target_first[token] * logits_to_probs(logits[0, -1], **sampling)
        assert total_variation(draft_first, target_first) > 0.2  # the draft alone would fail the check below

        samples, tolerance = 3000, 0.05  # measured: 0.013 and 0.026 (noise); wrong rules 0.22 to 0.34
        first, second = first_two_tokens(model, draft, prefix, cur_token, samples, 2, **sampling)
        assert total_variation(first, target_first) < tolerance
        assert total_variation(second, target_second) < tolerance

        for coin in (-1.0, 1.0):  # the rule is `coin * p_draft < p_target`, the coin uniform in [0, 1)
            monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, coin, **kw))
            wrong_first, wrong_second = first_two_tokens(model, draft, prefix, cur_token, 1000, 2, **sampling)
            assert max(total_variation(wrong_first, target_first),
                       total_variation(wrong_second, target_second)) > 2 * tolerance, coin


def test_draft_with_another_tokenizer_is_refused(smollm2_checkpoint, tiny_models, tmp_path, capsys):
    _, _, tiny = tiny_models["llama"]
    draft_dir = tmp_path / "draft"
    shutil.copytree(smollm2_checkpoint.parent, draft_dir, ignore=shutil.ignore_patterns("*.pth"))
    shutil.copy(tiny, draft_dir / "model.pth")  # 256-token vocabulary under SmolLM2's tokenizer files
    code, err = main_exit(["--checkpoint_path", smollm2_checkpoint, "--draft_checkpoint_path", draft_dir / "model.pth",
                           "--max_new_tokens", 3], capsys)
    assert code == 2 and "does not share the target's tokenizer" in err and "vocabulary size" in err


def test_speculative_needs_batch_one(smollm2_checkpoint, capsys):
    code, err = main_exit(["--checkpoint_path", smollm2_checkpoint, "--draft_checkpoint_path", smollm2_checkpoint,
                           "--batch_size", 2], capsys)
    assert code == 2 and "--batch_size 1" in err


@pytest.mark.slow
def test_smollm2_compiled_speculative_with_int8_draft_equals_greedy(smollm2_checkpoint):
    """The CLI, compiled, target float32 with its int8 copy as draft: the text of plain greedy decoding. (Compiled
    regionally: the drafting logic is the same in both modes, whole-graph compiles of the target, the draft and
    the verification took 7 minutes of the suite; the whole mode is pinned by test_generate's compile tests.)"""
    draft = quantize_checkpoint(smollm2_checkpoint, "int8", 32)
    common = ["--checkpoint_path", smollm2_checkpoint, "--chat", "--prompt", "Write a haiku about the sea.",
              "--dtype", "float32", "--max_new_tokens", 48]
    plain = run_cli(*common)
    drafted = run_cli(*common, "--compile", "--compile_mode", "regional", "--draft_checkpoint_path", draft,
                      "--speculate_k", 4)
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and len(plain.stdout) > 40
    assert "Acceptance:" in drafted.stderr


# ---------------------------------------------------------------- Medusa


def test_tree_buffers_worked_out_by_hand():
    """Root r; (0,) -> node 1, (1,) -> node 2, (0, 0) -> node 3. Top-k is 2, so the candidate list is
    [root, head 0 rank 0, head 0 rank 1, head 1 rank 0, head 1 rank 1]."""
    tree = build_tree([(1,), (0, 0), (0,)])  # any order: parents are sorted first
    assert tree.topk == 2
    assert tree.token_indices.tolist() == [0, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.attention.int().tolist() == [[1, 0, 0, 0],
                                             [1, 1, 0, 0],
                                             [1, 0, 1, 0],
                                             [1, 1, 0, 1]]
    assert tree.paths.tolist() == [[0, 2, -1], [0, 1, 3]]  # leaves (1,) and (0, 0)
    # In the cache: prefix of 3 slots, the tree in slots 3..6 of 8.
    mask = tree_attention_mask(tree, 3, 8)[0, 0].int().tolist()
    assert mask == [[1, 1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0, 1, 0]]
    wide = build_tree([(0,), (2,), (0, 1)])  # top-k 3: (2,) is head 0 rank 2, (0, 1) head 1 rank 1
    assert wide.token_indices.tolist() == [0, 1, 3, 1 + 3 + 1]


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="no parent"):
        build_tree([(0,), (1, 0)])
    with pytest.raises(ValueError, match="neither a tree name"):
        parse_tree("no-such-tree")


def random_heads(model, num_heads=3, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads.fresh(model.output, num_heads)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return heads


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_medusa_equals_greedy(family, tiny_models):
    """Random heads (fresh copies of the output projection, perturbed) over every shipped shallow tree.
    Fresh heads guess the next token, not the one after, so some guesses land and some do not."""
    _, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    heads = random_heads(model, 4)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0))
    plain = generate_tokens(model, prompt, 40)
    accepted = []
    for name in ("chain1", "chain3", "tree4", "tree8", "mc_sim_7b_63"):
        timings = {}
        drafted = generate_tokens(model, prompt, 40, drafter=MedusaDrafter(heads, parse_tree(name)), timings=timings)
        assert torch.equal(drafted, plain), name
        accepted += timings["accepted"]
    assert 0 < sum(accepted) < 40 * 5  # paths were both kept and cut


@pytest.mark.parametrize("wrong_rank", [None, 2])
def test_medusa_keeps_the_accepted_path_in_the_cache(tiny_models, wrong_rank):
    """Guesses set to the target's own greedy continuation are all accepted along (0, 0, 0, 0); with head 2's
    best guess wrong and its second right, the path (0, 0, 1) wins, whose nodes are not in adjacent slots.
    Either way the cache then holds what plain decoding of the kept tokens writes there."""
    _, _, checkpoint = tiny_models["qwen3"]
    model, reference = load_model(checkpoint, "cpu", torch.float32), load_model(checkpoint, "cpu", torch.float32)
    heads = random_heads(model, 4)
    tree = parse_tree("mc_sim_7b_63")
    prefix = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    cur = torch.tensor([[5]])
    for m in (model, reference):
        m.setup_caches(1, 128)
    with torch.no_grad():
        continuation = generate_tokens(reference, torch.cat([prefix, cur], dim=1)[0], 5)[0, 10:]
        head_logits = torch.zeros(4, 256)
        head_logits[torch.arange(4), continuation[:4]] = 10.0
        if wrong_rank is not None:
            head_logits[wrong_rank, (continuation[wrong_rank] + 1) % 256] = 20.0
        model(prefix, torch.arange(9))
        produced, accepted, _ = medusa_decode(model, heads, tree, cur, head_logits, 9)
        assert accepted == (4 if wrong_rank is None else 3)
        assert torch.equal(produced, continuation[: accepted + 1])
        kept = torch.cat([cur[0], produced[:-1]])
        reference(torch.cat([prefix, kept[None]], dim=1), torch.arange(9 + len(kept)))
    n = 9 + len(kept)
    for ours, theirs in zip(model.layers, reference.layers):
        for name in ("k_cache", "v_cache"):
            assert torch.allclose(getattr(ours.attention.kv_cache, name)[..., :n, :],
                                  getattr(theirs.attention.kv_cache, name)[..., :n, :], atol=1e-5)


def test_published_head_layout_loads_and_mismatches_are_refused(tiny_models, tmp_path):
    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    # Built by hand in FasterDecoding's key layout: {head}.{layer}.linear.weight|bias, {head}.{num_layers}.weight.
    state_dict = {}
    for head in range(2):
        state_dict[f"{head}.0.linear.weight"] = torch.randn(64, 64)
        state_dict[f"{head}.0.linear.bias"] = torch.randn(64)
        state_dict[f"{head}.1.weight"] = torch.randn(256, 64)
    folder = tmp_path / "heads"
    folder.mkdir()
    torch.save(state_dict, folder / "medusa_lm_head.pt")
    (folder / "config.json").write_text('{"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "x"}')
    heads = load_medusa_heads(folder, model.args)
    assert len(heads) == 2 and torch.equal(heads[1][1].weight, state_dict["1.1.weight"])
    hidden = torch.randn(64)
    expected = state_dict["0.1.weight"] @ (hidden + torch.nn.functional.silu(state_dict["0.0.linear.weight"] @ hidden + state_dict["0.0.linear.bias"]))
    assert torch.allclose(heads(hidden)[0], expected, atol=1e-4)

    state_dict["1.1.weight"] = torch.randn(300, 64)  # another vocabulary
    torch.save(state_dict, folder / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match="vocabulary size"):
        load_medusa_heads(folder, model.args)
    for key in list(state_dict):
        state_dict[key] = torch.randn(*[48 if n == 64 else n for n in state_dict[key].shape])  # another hidden size
    state_dict["1.1.weight"] = torch.randn(256, 48)
    torch.save(state_dict, folder / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match="hidden size"):
        load_medusa_heads(folder, model.args)


def test_medusa_cli_errors(smollm2_checkpoint, tmp_path, capsys):
    code, err = main_exit(["--checkpoint_path", smollm2_checkpoint, "--medusa_checkpoint_path", tmp_path / "none"], capsys)
    assert code == 2 and "Medusa heads" in err and "not found" in err
    code, err = main_exit(["--checkpoint_path", smollm2_checkpoint, "--medusa_checkpoint_path", tmp_path,
                           "--medusa_choices", "tree9"], capsys)
    assert code == 2 and "neither a tree name" in err


def test_bundled_medusa_model_is_split_by_the_converter(tmp_path):
    """A "medusa-1.0" HF folder carries medusa_head.* beside the base weights: the converter writes the base
    model as usual and the heads in the published layout, which load and compute as the bundled tensors do."""
    from safetensors.torch import load_file, save_file

    config = family_configs()["llama"]
    folder = tmp_path / "medusa-1.0-tiny"
    build_hf_model(config).save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    heads = {}
    for head in range(3):
        heads[f"medusa_head.{head}.0.linear.weight"] = torch.randn(64, 64)
        heads[f"medusa_head.{head}.0.linear.bias"] = torch.randn(64)
        heads[f"medusa_head.{head}.1.weight"] = torch.randn(256, 64)
    save_file({**weights, **heads}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = convert(checkpoint_dir=folder)
    model = load_model(checkpoint, "cpu", torch.float32)
    loaded = load_medusa_heads(folder / "medusa", model.args)
    assert len(loaded) == 3
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, heads["medusa_head." + name])


@pytest.mark.slow
def test_smollm2_trained_heads_compiled_medusa_equals_greedy(smollm2_checkpoint, tmp_path):
    """scripts/train_medusa.py (a few seconds of data) writes heads; the CLI, compiled, float32, with those heads
    and two trees (one eager, one compiled regionally) gives the text of plain greedy decoding."""
    import subprocess
    import sys

    from test_generate import ROOT

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nWhy is the sky blue?\n")
    heads = tmp_path / "heads"
    trained = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_medusa.py"), "--checkpoint_path",
                              smollm2_checkpoint, "--prompt_file", prompts, "--samples_per_prompt", "2",
                              "--answer_length", "32", "--epochs", "2", "--output_dir", heads],
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert "| 0 | token t+2 |" in trained.stdout and (heads / "medusa_lm_head.safetensors").is_file()
    common = ["--checkpoint_path", smollm2_checkpoint, "--chat", "--prompt", "What is the capital of France?",
              "--dtype", "float32", "--max_new_tokens", 40]
    plain = run_cli(*common)
    assert plain.returncode == 0 and "Paris" in plain.stdout
    for tree, compile_flag in (("chain2", []), ("tree8", ["--compile", "--compile_mode", "regional"])):
        medusa = run_cli(*common, *compile_flag, "--medusa_checkpoint_path", heads, "--medusa_choices", tree)
        assert medusa.returncode == 0, medusa.stderr
        assert medusa.stdout == plain.stdout, tree
        assert "Acceptance:" in medusa.stderr


# ---------------------------------------------------------------- stub models: each branch pinned exactly


class CountingModel(torch.nn.Module):
    """A stub whose logits at each position are fixed by the token there: the next token is rule(token). Its
    hidden state is the token one-hot (what stub Medusa heads read). It keeps no cache: nothing to go stale."""

    def __init__(self, rule, vocab_size=64):
        super().__init__()
        self.rule, self.vocab_size, self.layers, self.max_seq_length = rule, vocab_size, [], 64

    def forward(self, idx, input_pos, mask=None, cache_pos=None, return_hidden=False, last_only=False):
        idx = idx[:, -1:] if last_only else idx  # as Transformer.forward: the last position's outputs only
        hidden = torch.nn.functional.one_hot(idx, self.vocab_size).float()
        logits = torch.nn.functional.one_hot(self.rule(idx) % self.vocab_size, self.vocab_size).float() * 10
        return (logits, hidden) if return_hidden else logits


class GuessingHeads(torch.nn.Module):
    """Stub Medusa heads: from the hidden state of token t, head j guesses guess(t, j) (truth: t + 2 + j)."""

    def __init__(self, guess, num_heads=3, vocab_size=64):
        super().__init__()
        self.guess, self.num_heads, self.vocab_size = guess, num_heads, vocab_size

    def __len__(self):
        return self.num_heads

    def forward(self, hidden):
        token = hidden.argmax(-1)  # [rows]
        guesses = torch.stack([self.guess(token, j) % self.vocab_size for j in range(self.num_heads)], dim=-1)
        return torch.nn.functional.one_hot(guesses, self.vocab_size).float()  # [rows, heads, vocab]


def plus_one(token):
    return token + 1


def run_recording_steps(drafter, new_tokens=13, prompt=(0,), vocab_size=64):
    """generate() with the counting target after `prompt`; the tokens each drafting step produced."""
    steps, step = [], drafter.step

    def recording_step(*args, **kwargs):
        produced, accepted, drafted = step(*args, **kwargs)
        steps.append((produced.tolist(), accepted))
        return produced, accepted, drafted

    drafter.step = recording_step
    output = generate_tokens(CountingModel(plus_one, vocab_size), torch.tensor(prompt), new_tokens, drafter=drafter)
    counting = [(prompt[-1] + i) % vocab_size for i in range(1, new_tokens + 1)]
    assert output[0, len(prompt):].tolist() == counting  # exactly plain greedy decoding's tokens
    return steps


@pytest.mark.parametrize("case, draft_rule, expected", [
    # The draft agrees with the target: all 3 drafts kept plus the target's bonus token, 4 tokens per step.
    ("always", plus_one, [([2, 3, 4, 5], 3), ([6, 7, 8, 9], 3), ([10, 11, 12, 13], 3)]),
    # The draft is always wrong: each step yields the target's own token only.
    ("never", lambda t: t + 2, [([t], 0) for t in range(2, 14)]),
    # Wrong after tokens 2, 5, 8, ... (t % 3 == 2): from cur 1 the drafts are 2, 4 (wrong), 5: one kept and the
    # target's 3; from cur 3, 6, 9, 12 two kept and the third replaced. The last step's 14, 15 are cut at 13 tokens.
    ("sometimes", lambda t: torch.where(t % 3 == 2, t + 2, t + 1),
     [([2, 3], 1), ([4, 5, 6], 2), ([7, 8, 9], 2), ([10, 11, 12], 2), ([13, 14, 15], 2)]),
])
def test_speculative_steps_with_stub_models(case, draft_rule, expected):
    """First token 1 comes from prefill; then each step from cur_token: drafts, verification, kept tokens."""
    assert run_recording_steps(SpeculativeDrafter(CountingModel(draft_rule), speculate_k=3, adaptive=False)) == expected


@pytest.mark.parametrize("case, guess, expected", [
    ("always", lambda t, j: t + 2 + j, [([2, 3, 4, 5], 3), ([6, 7, 8, 9], 3), ([10, 11, 12, 13], 3)]),
    ("never", lambda t, j: t + 7, [([t], 0) for t in range(2, 14)]),
    # Head 1 is wrong from the hidden state of tokens 4, 7, 10 (t % 3 == 1): from t = 0 all three kept (cur 1:
    # 2, 3, 4 and the target's 5); from t = 4 only head 0's 6, then the target's 7; from t = 6 all three; t = 10 one.
    ("sometimes", lambda t, j: torch.where((j == 1) & (t % 3 == 1), t + 9, t + 2 + j),
     [([2, 3, 4, 5], 3), ([6, 7], 1), ([8, 9, 10, 11], 3), ([12, 13], 1)]),
])
def test_medusa_steps_with_stub_heads(case, guess, expected):
    assert run_recording_steps(MedusaDrafter(GuessingHeads(guess), parse_tree("chain3"))) == expected


@pytest.mark.parametrize("case, prompt, vocab_size, expected", [
    # The prompt holds the cycle the target follows: (0, 1) continues as 2, 3, 4, 5 (all kept, bonus 6); then
    # (4, 5, 6) as 7, 0, 1, 2 (bonus 3); then (1, 2, 3), latest at the output's own 1, 2, 3, as 4, 5, 6, 7.
    ("always", list(range(8)) + [0], 8, [([2, 3, 4, 5, 6], 4), ([7, 0, 1, 2, 3], 4), ([4, 5, 6, 7, 0], 4)]),
    # Nothing the target writes occurred before: plain steps only.
    ("never", [0], 64, [([t], 0) for t in range(2, 14)]),
    # (0, 1) continues as 2, 3, 50, 51 in the prompt: two kept and the target's 4; then nothing matches.
    ("sometimes", [0, 1, 2, 3, 50, 51, 0], 64, [([2, 3, 4], 2)] + [([t], 0) for t in range(5, 14)]),
])
def test_prompt_lookup_steps_with_stub_model(case, prompt, vocab_size, expected):
    drafter = PromptLookupDrafter(num_tokens=4, max_ngram=3, adaptive=False)
    assert run_recording_steps(drafter, prompt=prompt, vocab_size=vocab_size) == expected


def test_ngram_index_finds_the_latest_earlier_occurrence():
    index = NgramIndex(max_ngram=2)
    index.extend([5, 6, 7, 5, 6, 9, 5])
    assert index.continuation(3) == [6, 9, 5]  # (5,) last seen at 3, followed by 6, 9, 5
    index.extend([6])
    assert index.continuation(2) == [9, 5]  # (5, 6) last seen at 3
    index.extend([1])
    assert index.continuation(2) == []  # (6, 1) and (1,) never seen before


def test_ngram_index_with_a_minimum_length_ignores_shorter_matches():
    index = NgramIndex(max_ngram=3, min_ngram=2)
    index.extend([5, 6, 7, 8, 5])
    assert index.continuation(2) == []  # only (5,) matches: too short
    index.extend([6])
    assert index.continuation(2) == [7, 8]  # (5, 6) seen at 0


def test_draft_length_adapts_and_pauses_when_drafting_does_not_pay():
    length = DraftLength(maximum=6, pause=3, baseline_steps=2)
    for seconds in (90.0, 0.010):  # the baseline: plain steps of 10 ms, the first one compiling (not timed)
        assert length.next() == 0
        length.update(0, 0, 1, seconds)
    assert length.next() == 6
    length.update(6, 6, 7, 300.0)  # the first drafted step compiles verification: not timed, not judged
    assert length.next() == 6 and not length.never_pays and length.step_seconds[True] is None
    length.update(6, 2, 3, 0.015)  # 3 tokens in 15 ms beats 1 in 10 ms: keep drafting, one fewer
    assert length.next() == 5
    length.update(5, 5, 6, 0.024)  # all kept: two more, capped at the maximum
    assert length.next() == 6
    length.update(6, 0, 1, 0.070)  # averaged, drafting now yields fewer tokens per second than plain: pause 3
    assert length.next() == 0 and length.pause == 6
    for _ in range(3):
        length.update(0, 0, 1, 0.010)
    assert length.next() == 5  # drafting resumes with the length the rejection left
    length.update(5, 0, 1, 0.030)  # fails again: the pause doubles
    assert length.plain_left == 6 and length.pause == 12
    length.plain_left = 0
    length.update(5, 0, 1, 0.100)  # a drafted step dearer than maximum + 1 plain steps can never pay
    assert length.never_pays and length.next() == 0
    fixed = DraftLength(maximum=4, adaptive=False)
    fixed.update(4, 0, 1, 1.0)
    assert fixed.next() == 4


def test_accepting_certain_drafts_samples_the_target_distribution():
    """Prompt lookup's drafts are certain (p_draft = 1): the first token produced must still follow the target's
    own distribution, whatever the drafts; and the kept-token rate of draft i is p_target(draft i)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 12) * 2
    drafts = torch.tensor([3, 7, 1])
    first = torch.zeros(12)
    kept_first = 0
    for _ in range(4000):
        accepted, next_token = accept_drafts(logits, drafts, None, temperature=1.0)
        first[drafts[0] if accepted > 0 else next_token] += 1
        kept_first += accepted > 0
    target = torch.softmax(logits[0], -1)
    assert total_variation(first / 4000, target) < 0.03
    assert abs(kept_first / 4000 - target[3].item()) < 0.03


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_prompt_lookup_equals_greedy(family, tiny_models):
    """Fixed and adaptive lengths, on a prompt that repeats itself (as text to rewrite does)."""
    _, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    phrase = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(1))
    prompt = torch.cat([phrase, phrase[:5]])
    plain = generate_tokens(model, prompt, 40)
    accepted = []
    for adaptive in (False, True):
        timings = {}
        drafted = generate_tokens(model, prompt, 40, drafter=PromptLookupDrafter(5, 3, adaptive), timings=timings)
        assert torch.equal(drafted, plain), adaptive
        accepted += timings["accepted"]
    assert sum(accepted) > 0  # the repeated phrase was drafted and kept


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_adaptive_speculative_equals_greedy(family, tiny_models, tmp_path, monkeypatch):
    """The adaptive length with plain steps between drafts (forced here: drafting never pays) and the draft
    catching up on the tokens of those plain steps."""
    _, _, checkpoint = tiny_models[family]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0))
    plain = generate_tokens(model, prompt, 40)
    update = DraftLength.update  # as timed on a machine where every drafted step is slow

    def slow_drafts(self, drafted, accepted, produced, seconds):
        update(self, drafted, accepted, produced, 1.0 if drafted else 0.001)

    monkeypatch.setattr(DraftLength, "update", slow_drafts)
    draft = load_model(quantize_checkpoint(checkpoint, "int4", 32), "cpu", torch.float32)
    timings = {}
    drafted = generate_tokens(model, prompt, 40, drafter=SpeculativeDrafter(draft, 4), timings=timings)
    assert torch.equal(drafted, plain)
    # 2 plain steps to time (the first untimed), a drafted one (untimed), a drafted one (too slow: never again)
    assert timings["accepted"].count(0) >= 20 and max(timings["accepted"]) > 0


def test_draft_length_hands_runs_of_plain_steps_to_the_plain_loop():
    """plain_run: the steps a pause (or drafting that never pays) leaves to plain decoding, taken in one run of
    the plain loop; the first plain step stays on its own (it may compile, and is not timed)."""
    length = DraftLength(maximum=4, pause=8, baseline_steps=3)
    assert length.plain_run() == 0
    length.update(0, 0, 1, 90.0)
    assert length.plain_run() == 2  # the rest of the baseline
    length.plain_ran(2, 0.02)
    assert length.plain_left == 0 and length.step_seconds[False] == pytest.approx(0.01)
    assert length.plain_run() == 0 and length.next() == 4
    length.never_pays = True
    assert length.plain_run() >= 1 << 30
    assert DraftLength(maximum=4, adaptive=False).plain_run() == 0


def test_a_pause_runs_in_the_plain_loop_and_the_draft_catches_up(tiny_models, monkeypatch):
    """A pause's plain steps go to generate's plain loop in one call; the tokens it decoded reach the draft's
    cache before drafting resumes: a draft identical to the target then has nearly everything accepted (with
    those tokens missing from its cache it would propose from another context), and the tokens are plain
    greedy decoding's."""
    import generate

    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0))
    plain = generate_tokens(model, prompt, 40)
    update = DraftLength.update  # as timed where drafted steps pay
    monkeypatch.setattr(DraftLength, "update", lambda self, drafted, accepted, produced, seconds:
                        update(self, drafted, accepted, produced, 0.001 if drafted else 1.0))
    runs = []
    decode_n_tokens = generate.decode_n_tokens

    def counted(model, cur_token, input_pos, count, *args, **kwargs):
        runs.append(count)
        return decode_n_tokens(model, cur_token, input_pos, count, *args, **kwargs)

    monkeypatch.setattr(generate, "decode_n_tokens", counted)
    drafter = SpeculativeDrafter(load_model(checkpoint, "cpu", torch.float32), 4)
    drafter.length.untimed[False], drafter.length.plain_left = False, 10  # a pause of 10 steps to begin with
    timings = {}
    drafted = generate_tokens(model, prompt, 40, drafter=drafter, timings=timings)
    assert torch.equal(drafted, plain)
    assert runs == [10] and timings["accepted"][:10] == [0] * 10
    after = timings["accepted"][10:-1]
    assert after and sum(after) >= 3 * len(after)
