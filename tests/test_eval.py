"""eval.py: sliding-window perplexity is the plain perplexity where one window covers the text; quantized quality."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
from generate import load_model
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
