"""eval.py: sliding-window perplexity is the plain perplexity where one window covers the text; quantized quality;
the lm-evaluation-harness adapter against plain forwards, perplexity and generate (without lm_eval installed)."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
import generate as generate_module
from generate import generate, load_model
from quantize import quantize_checkpoint

TEXT = Path("/usr/share/common-licenses/GPL-3")  # real English prose that every Debian machine has


def test_sliding_windows_score_each_token_once(tiny_models):
    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, 100)
    with torch.no_grad():
        logits = model(tokens[None], torch.arange(100))[0, :-1]
    direct = torch.exp(F.cross_entropy(logits, tokens[1:])).item()
    whole, scored = evaluate.perplexity(model, tokens, max_seq_length=128, stride=64)
    assert scored == 99 and abs(whole - direct) < 1e-3 * direct
    windowed, scored = evaluate.perplexity(model, tokens, max_seq_length=40, stride=20)
    assert scored == 99  # every token after the first, once
    assert abs(windowed - direct) > 1e-6  # shorter context changes the numbers: the windows are real


def test_missing_text_file(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint_path", str(checkpoint), "--text_file", str(tmp_path / "none.txt")])
    assert exit_info.value.code == 2 and "text file" in capsys.readouterr().err


@pytest.mark.slow
def test_quantized_perplexity_on_real_text(smollm2_checkpoint):
    """SmolLM2 on the GPL-3 text: int8 within 1% of float32, int4 g32 within 15% (README has the full table)."""
    tokenizer = evaluate.Tokenizer(smollm2_checkpoint.parent)
    tokens = torch.tensor(tokenizer.encode(TEXT.read_text())[:2048])
    results = {}
    for name, path in [("float32", smollm2_checkpoint),
                       ("int8", quantize_checkpoint(smollm2_checkpoint, "int8", 32)),
                       ("int4", quantize_checkpoint(smollm2_checkpoint, "int4", 32))]:
        results[name], _ = evaluate.perplexity(load_model(path, "cpu", torch.float32), tokens, 512, 256)
    assert 5 < results["float32"] < 50
    assert results["int8"] / results["float32"] < 1.01, results
    assert results["int4"] / results["float32"] < 1.15, results


def test_checkpoint_without_tokenizer(tiny_models, tmp_path, capsys):
    _, _, checkpoint = tiny_models["llama"]
    (tmp_path / "model.pth").symlink_to(checkpoint)
    (tmp_path / "text.txt").write_text("some text " * 20)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint_path", str(tmp_path / "model.pth"), "--text_file", str(tmp_path / "text.txt")])
    assert exit_info.value.code == 2 and "no tokenizer.json or tokenizer.model" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--max_seq_length", "1"], ["--max_seq_length", "64", "--stride", "128"]])
def test_bad_window_flags(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint_path", "x.pth", "--text_file", "x.txt", *flags])
    assert exit_info.value.code == 2 and "--stride <= --max_seq_length" in capsys.readouterr().err


# ---------------------------------------------------------------- lm-evaluation-harness adapter


class ByteTokenizer:
    """Stands in for Tokenizer on the tiny models (vocabulary 256): one token per latin-1 character, BOS 1, EOS 2."""
    bos_id, eos_ids = 1, [2]

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_id] if add_special_tokens else []) + list(text.encode("latin-1"))

    def decode(self, ids):
        return bytes(ids).decode("latin-1")


class Request:
    """lm-eval's Instance as the adapter reads it: only `.args`."""

    def __init__(self, *args):
        self.args = args


def continuation_log_prob(model, context: list, continuation: list) -> tuple:
    """The reference: log P(continuation | context) and greedy match from one plain forward."""
    ids = torch.tensor(context + continuation)
    model.setup_caches(1, len(ids))
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids[None], torch.arange(len(ids)))[0].float(), dim=-1)
    rows, target = log_probs[len(context) - 1:-1], torch.tensor(continuation)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_harness_loglikelihood_matches_a_plain_forward(tiny_models):
    _, _, checkpoint = tiny_models["mistral"]
    model = load_model(checkpoint, "cpu", torch.float32)
    tokenizer = ByteTokenizer()
    greedy = generate(model, torch.tensor(tokenizer.encode("abc")), 4)[0, 4:].tolist()
    requests = [Request("abc", tokenizer.decode(greedy)), Request("the cat ", "sat"),
                Request("", "hello"), Request("a much longer context than the others", " x")]
    # trailing spaces move to the continuation; an empty context is BOS
    expected_ids = [([1, 97, 98, 99], greedy), ([1] + list(b"the cat"), list(b" sat")), ([1], list(b"hello")),
                    ([1] + list(b"a much longer context than the others"), list(b" x"))]
    expected = [continuation_log_prob(model, *ids) for ids in expected_ids]
    for batch_size in (1, 3):  # padded batches give each request its own numbers
        results = evaluate.HarnessModel(model, tokenizer, 64, batch_size).loglikelihood(requests)
        assert [r[1] for r in results] == [e[1] for e in expected] and results[0][1]  # greedy continuation
        assert all(abs(r[0] - e[0]) < 1e-4 for r, e in zip(results, expected)), (results, expected)
    # a context longer than the window keeps its last tokens
    short = evaluate.HarnessModel(model, tokenizer, 8, 1).loglikelihood([requests[3]])[0][0]
    assert abs(short - continuation_log_prob(model, list(b"e others"[1:]), list(b" x"))[0]) < 1e-4


def test_harness_rolling_is_the_perplexity_windows(tiny_models):
    _, _, checkpoint = tiny_models["llama"]
    model = load_model(checkpoint, "cpu", torch.float32)
    text = "sliding windows over a text that is longer than one window " * 2
    ids = torch.tensor([1] + list(text.encode()))
    (rolling,) = evaluate.HarnessModel(model, ByteTokenizer(), 64).loglikelihood_rolling([Request(text)])
    value, scored = evaluate.perplexity(model, ids, 64, 32)
    assert scored == len(ids) - 1 and abs(rolling + scored * math.log(value)) < 1e-3


def test_harness_generate_until_stops_at_the_stop_string(tiny_models):
    _, _, checkpoint = tiny_models["mistral"]  # its greedy text from this prompt has no repeats early on
    model = load_model(checkpoint, "cpu", torch.float32)
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode("once upon")
    greedy = generate(model, torch.tensor(prompt), 12)[0, len(prompt):].tolist()
    text = tokenizer.decode(generate_module.until_stop(greedy, tokenizer.eos_ids))
    assert len(text) == 12
    harness = evaluate.HarnessModel(model, tokenizer, 64)
    assert harness.generate_until([Request("once upon", {"until": [], "max_gen_toks": 12})]) == [text]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    stop = text[3:5]  # cut at its first occurrence, and no token generated past it
    output = harness.generate_until([Request("once upon", {"until": ["never there", stop], "max_gen_toks": 12})])
    assert output == [text.split(stop)[0]] and len(output[0]) <= 3 and len(forwards) <= 5


def test_harness_mixes_into_lm_evals_abstract_lm(tiny_models, monkeypatch):
    """harness_lm makes an instance of lm_eval's LM (a stand-in here with the same abstract methods and
    __init__, so that this runs without lm_eval installed), with our device after LM's __init__."""
    import abc
    import types

    class LM(abc.ABC):
        def __init__(self):
            self._rank, self._world_size, self._device = 0, 1, None

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

    modules = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
               "lm_eval.api.model": types.ModuleType("lm_eval.api.model")}
    modules["lm_eval.api.model"].LM = LM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    _, _, checkpoint = tiny_models["llama"]
    lm = evaluate.harness_lm(load_model(checkpoint, "cpu", torch.float32), ByteTokenizer(), 64, 2)
    assert isinstance(lm, LM) and lm._device == torch.device("cpu") and lm._rank == 0
    assert len(lm.loglikelihood([Request("ab", "c")])) == 1


def test_tasks_without_lm_eval_installed(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail, installed or not
    _, _, checkpoint = tiny_models["llama"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint_path", str(checkpoint), "--tasks", "hellaswag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "error: lm-evaluation-harness is not installed; pip install lm-eval\n"


def test_neither_text_file_nor_tasks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint_path", "x.pth"])
    assert exit_info.value.code == 2 and "give --text_file (perplexity) or --tasks" in capsys.readouterr().err


def test_harness_with_the_real_lm_eval(tiny_models):
    """Where lm-eval is installed: its Instance objects go through our LM subclass."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    _, _, checkpoint = tiny_models["llama"]
    lm = evaluate.harness_lm(load_model(checkpoint, "cpu", torch.float32), ByteTokenizer(), 64, 1)
    (result,) = lm.loglikelihood([Instance("loglikelihood", {}, ("ab", "c"), 0)])
    assert abs(result[0] - continuation_log_prob(lm.model, [1, 97, 98], [99])[0]) < 1e-4
