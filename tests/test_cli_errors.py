"""Every command line tool, run as a user runs it (a subprocess), answers bad input with one `error:` line naming
what was wrong and what to do, exit code 2, no traceback, and leaves its folder as it was; Ctrl-C exits 130
with nothing half-written (generate.py first prints what it generated and the summary)."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint as checkpoint_format

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_word_tokenizer(folder: Path, vocab_size: int = 256):
    """A whitespace tokenizer whose every id decodes ("w0 w1 ..."), for the tiny models that have none."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def make_input(kind: str, folder: Path, tiny_models) -> Path:
    """Build one bad (or good) input in `folder`; returns the path the command is given."""
    _, hf_folder, good = tiny_models["llama"]
    if kind == "hf_folder":
        shutil.copytree(hf_folder, folder / "hf", ignore=shutil.ignore_patterns("model.pth"))
        return folder / "hf"
    if kind == "file":
        (folder / "notes.txt").write_text("a file where a folder is expected\n")
        return folder / "notes.txt"
    write_word_tokenizer(folder)
    path = folder / "model.pth"
    data = good.read_bytes()
    if kind == "good":
        path.write_bytes(data)
    elif kind == "truncated":  # the first part of a real checkpoint, as an interrupted download leaves it
        path.write_bytes(data[: min(len(data) // 2, 1 << 20)])
    elif kind == "text":
        path.write_text("this is a text file, not a model\n" * 100)
    else:  # a checkpoint of ours with one tensor missing, or of the wrong shape
        ckpt = checkpoint_format.load(good)
        state_dict = dict(ckpt.state_dict)
        if kind == "missing_tensor":
            del state_dict["layers.1.feed_forward.w2.weight"]
        else:
            state_dict["layers.0.attention.wo.weight"] = torch.zeros(64, 32)
        torch.save({"model_args": ckpt.args.to_dict(), "quantization": None, "state_dict": state_dict}, path)
    return path


def snapshot(folder: Path) -> dict:
    """Every file's size and modification time, and every folder's name (a folder's own time changes when a
    temporary file comes and goes)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def run_tool(command: list, timeout=300, file_size_limit=None):
    def limit_file_size():  # a disk that fills up: writes past the limit fail (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ENV, preexec_fn=limit_file_size if file_size_limit else None)


LONG_PROMPT = " ".join(["w5"] * 300)  # the tiny models' context is 256 positions
CUDA_MISSING = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")

# (id, tool, input kind, arguments ({input} is the path make_input returned), words the error line must hold)
CASES = [
    ("bench-sizes-no-gguf", "scripts/bench_sizes.py", "hf_folder", ["--folder", "{input}"],
     ["has no", "model.f16.gguf", "random_model.py"]),
    ("bench-prompt-products-bad-shape", "scripts/bench_prompt_products.py", "file", ["--shapes", "12by4"],
     ["--shapes takes NxK pairs", "12by4"]),
    ("generate-truncated", "generate.py", "truncated", ["--checkpoint_path", "{input}"], ["is truncated or corrupt", "convert"]),
    ("generate-text-file", "generate.py", "text", ["--checkpoint_path", "{input}"], ["is not a PyTorch checkpoint"]),
    ("generate-missing-tensor", "generate.py", "missing_tensor", ["--checkpoint_path", "{input}"],
     ["lacks 1 tensor", "layers.1.feed_forward.w2.weight", "incomplete"]),
    ("generate-wrong-shape", "generate.py", "wrong_shape", ["--checkpoint_path", "{input}"],
     ["layers.0.attention.wo.weight", "has shape (64, 32)", "(64, 64)"]),
    ("generate-missing-file", "generate.py", "file", ["--checkpoint_path", "{input}.pth"], ["not found", "prepare.sh"]),
    ("generate-empty-prompt", "generate.py", "good", ["--checkpoint_path", "{input}", "--prompt", ""], ["the prompt is empty"]),
    ("generate-huge-cache", "generate.py", "good", ["--checkpoint_path", "{input}", "--max_seq_length", "100000000"],
     ["the KV cache for 100000000 positions", "GB, but this machine has", "GB free", "lower --max_seq_length"]),
    ("generate-prompt-past-context", "generate.py", "good", ["--checkpoint_path", "{input}", "--prompt", LONG_PROMPT],
     ["the prompt is 300 tokens but the model's context is 256"]),
    ("generate-zero-new-tokens", "generate.py", "good", ["--checkpoint_path", "{input}", "--max_new_tokens", "0"],
     ["--max_new_tokens must be at least 1"]),
    ("generate-negative-new-tokens", "generate.py", "good", ["--checkpoint_path", "{input}", "--max_new_tokens", "-3"],
     ["--max_new_tokens must be at least 1"]),
    ("generate-zero-samples", "generate.py", "good", ["--checkpoint_path", "{input}", "--num_samples", "0"],
     ["--num_samples must be at least 1"]),
    ("generate-top-p-zero", "generate.py", "good", ["--checkpoint_path", "{input}", "--top_p", "0"], ["--top_p must be in (0, 1]"]),
    ("generate-top-p-above-one", "generate.py", "good", ["--checkpoint_path", "{input}", "--top_p", "1.5"], ["--top_p must be in (0, 1]"]),
    ("generate-unknown-dtype", "generate.py", "good", ["--checkpoint_path", "{input}", "--dtype", "float64"], ["invalid choice: 'float64'"]),
    ("generate-cuda-missing", "generate.py", "good", ["--checkpoint_path", "{input}", "--device", "cuda"],
     ["no CUDA device is available", "--device cpu"]),
    ("quantize-truncated", "quantize.py", "truncated", ["--checkpoint_path", "{input}", "--mode", "int8"], ["is truncated or corrupt"]),
    ("quantize-text-file", "quantize.py", "text", ["--checkpoint_path", "{input}", "--mode", "int4"], ["is not a PyTorch checkpoint"]),
    ("quantize-missing-tensor", "quantize.py", "missing_tensor", ["--checkpoint_path", "{input}", "--mode", "int8"], ["lacks 1 tensor"]),
    ("eval-truncated", "eval.py", "truncated", ["--checkpoint_path", "{input}", "--text_file", "README.md"], ["is truncated or corrupt"]),
    ("eval-text-file", "eval.py", "text", ["--checkpoint_path", "{input}", "--text_file", "README.md"], ["is not a PyTorch checkpoint"]),
    ("convert-folder-is-a-file", "convert_hf_checkpoint.py", "file", ["--checkpoint_dir", "{input}"], ["is a file", "--checkpoint_dir"]),
    ("convert-gguf-output-is-a-file", "convert_hf_checkpoint.py", "file", ["--gguf", "README.md", "--checkpoint_dir", "{input}"],
     ["output folder", "is a file"]),
    ("convert-missing-folder", "convert_hf_checkpoint.py", "file", ["--checkpoint_dir", "{input}.d"], ["not found"]),
    ("train-medusa-truncated", "scripts/train_medusa.py", "truncated", ["--checkpoint_path", "{input}"], ["is truncated or corrupt"]),
    ("train-medusa-zero-epochs", "scripts/train_medusa.py", "good", ["--checkpoint_path", "{input}", "--epochs", "0"],
     ["must be at least 1"]),
    ("bench-unknown-row", "scripts/bench.py", "good", ["--checkpoint_path", "{input}", "--rows", "ours-int3"], ["unknown row 'ours-int3'"]),
    ("bench-missing-checkpoint", "scripts/bench.py", "file", ["--checkpoint_path", "{input}.pth", "--rows", "ours-bf16"], ["not found"]),
    ("bench-zero-runs", "scripts/bench.py", "good", ["--checkpoint_path", "{input}", "--runs", "0"], ["--runs must be at least 1"]),
    ("bench-cuda-missing", "scripts/bench.py", "good", ["--checkpoint_path", "{input}", "--device", "cuda", "--rows", "ours-bf16"],
     ["no CUDA device is available", "--device cpu"]),
    ("bench-hf-model-not-a-folder", "scripts/bench.py", "good",
     ["--checkpoint_path", "{input}", "--hf_model", "README.md", "--rows", "hf-eager-bf16"], ["is not a HF folder"]),
]


def assert_one_error_line(result, words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.mark.slow
@pytest.mark.parametrize("name, tool, kind, arguments, words", [
    pytest.param(*case, id=case[0], marks=[CUDA_MISSING] if "cuda" in case[0] else []) for case in CASES])
def test_bad_input(name, tool, kind, arguments, words, tiny_models, tmp_path):
    given = make_input(kind, tmp_path, tiny_models)
    before = snapshot(tmp_path)
    result = run_tool([tool, *(a.replace("{input}", str(given)) for a in arguments)])
    assert_one_error_line(result, words)
    assert snapshot(tmp_path) == before  # nothing written, nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["convert", "quantize"])
def test_full_disk_leaves_no_file(tool, tiny_models, tmp_path):
    """Writes fail past 64 KB (RLIMIT_FSIZE, as a disk that fills up): one line, exit 2, no partial file."""
    if tool == "convert":
        given = make_input("hf_folder", tmp_path, tiny_models)
        command, written = ["convert_hf_checkpoint.py", "--checkpoint_dir", given], given / "model.pth"
    else:
        given = make_input("good", tmp_path, tiny_models)
        command, written = ["quantize.py", "--checkpoint_path", given, "--mode", "int8"], tmp_path / "model_int8.pth"
    before = snapshot(tmp_path)
    result = run_tool(command, file_size_limit=64 * 1024)
    assert_one_error_line(result, [f"could not write {written}", "no space left on the device", "nothing was written"])
    assert snapshot(tmp_path) == before


def interrupt_when(command: list, ready, timeout=300):
    """Start `command`, send SIGINT once ready(stdout so far, stderr so far) holds, return (code, stdout, stderr)."""
    # SIGINT back to its default in the child: a suite started in the background of a shell inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler.
    process = subprocess.Popen([sys.executable, *map(str, command)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(process.stdout.fileno(), False)
    os.set_blocking(process.stderr.fileno(), False)
    out, err, deadline, sent = b"", b"", time.monotonic() + timeout, False
    while process.poll() is None and time.monotonic() < deadline:
        out += process.stdout.read() or b""
        err += process.stderr.read() or b""
        if not sent and ready(out.decode(errors="replace"), err.decode(errors="replace")):
            process.send_signal(signal.SIGINT)
            sent = True
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    rest_out, rest_err = process.communicate()
    assert sent, "the command ended before it could be interrupted"
    return process.returncode, (out + rest_out).decode(errors="replace"), (err + rest_err).decode(errors="replace")


@pytest.mark.slow
def test_ctrl_c_during_generation_prints_the_text_and_the_summary(tiny_models, tmp_path):
    given = make_input("good", tmp_path, tiny_models)
    code, out, err = interrupt_when(["generate.py", "--checkpoint_path", given, "--prompt", "w1 w2 w3", "--dtype", "float32",
                                     "--max_new_tokens", "20000", "--ignore_eos"], lambda out, err: out.count("w") > 20)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    generated = int(err.split("Generated ")[1].split(" tokens")[0])
    assert 20 < generated < 20000 and "(interrupted)" in err and "tok/s" in err
    assert len(out.split()) >= 20  # what was streamed stays printed


@pytest.mark.slow
def test_ctrl_c_during_quantization_leaves_no_file(tiny_models, tmp_path):
    given = make_input("good", tmp_path, tiny_models)
    before = snapshot(tmp_path)
    code, _, err = interrupt_when(["quantize.py", "--checkpoint_path", given, "--mode", "int4-gptq", "--calibration_samples",
                                   "64", "--calibration_length", "2048"], lambda out, err: "calibration" in err)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_ctrl_c_during_conversion_leaves_no_file(smollm2_gguf, tmp_path):
    code, _, err = interrupt_when(["convert_hf_checkpoint.py", "--gguf", smollm2_gguf, "--checkpoint_dir", tmp_path / "out"],
                                  lambda out, err: "reading GGUF" in err)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert not list((tmp_path / "out").glob("*.pth*"))  # no checkpoint, no temporary file


@pytest.mark.slow
def test_torchrun_launch_with_a_bad_checkpoint(tiny_models, tmp_path):
    """Under torchrun every rank exits 2 and rank 0 alone says why; torchrun then reports the failed ranks."""
    given = make_input("truncated", tmp_path, tiny_models)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "generate.py", "--checkpoint_path", str(given)], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=ENV)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is truncated or corrupt" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error: ")[0]
