"""Prompt speed, load time and memory at real sizes: ours against llama.cpp on the same weights, side by side.

    python scripts/random_model.py --shape smollm2-1.7b --dtype bfloat16 --gguf          # model.pth + model.f16.gguf
    python quantize.py --checkpoint_path checkpoints/random-smollm2-1.7b-bfloat16/model.pth --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/random-smollm2-1.7b-bfloat16/model.pth --mode int8
    python scripts/bench_sizes.py --folder checkpoints/random-smollm2-1.7b-bfloat16 --runs 3

Each run of each row is a fresh process (the file in the page cache after the first), rows alternating run by
run: load time (to the first prompt token), prefill tok/s of a --prompt_tokens prompt (the same token ids for
both engines), the peak resident set (VmHWM) and the resident set after the answer (VmRSS), medians of --runs.
Our rows run generate.py eagerly (no compiled decode: its build takes minutes at this size); llama.cpp's run
llama-cpp-python with its default buffer types (Q4_0 and Q8_0 repacked where the CPU takes it).
"""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import cli  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402

PAIRS = {"bf16": ("model.pth", "F16"), "int8": ("model_int8.pth", "Q8_0"), "int4": ("model_int4.g32.pth", "Q4_0")}

LLAMACPP_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import llama_cpp
path, ids, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + 64, n_batch=512, n_threads=threads, verbose=False)
loaded = time.perf_counter() - start
t = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"load_s": loaded, "prefill_tok_s": len(ids) / prefill,
                  "rss_gb": int(status["VmRSS"].split()[0]) / 1e6, "peak_gb": int(status["VmHWM"].split()[0]) / 1e6}))
"""


def llamacpp_gguf(folder: Path, kind: str) -> Path:
    """The F16 GGUF random_model.py wrote, or its Q8_0 / Q4_0 by llama.cpp's quantizer (written once)."""
    source = folder / "model.f16.gguf"
    if kind == "F16":
        return source
    target = folder / f"model.{kind.lower()}.gguf"
    return target if target.exists() else bench.llamacpp_quantize(source, target, kind)


def ours(checkpoint: Path, text: str, tokens: int) -> dict:
    command = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint), "--prompt", text,
               "--max_new_tokens", "2", "--report_memory"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise UsageError(f"generate.py failed on {checkpoint}: {result.stderr.strip().splitlines()[-1]}")
    log = result.stderr
    prefill = re.search(r"prefill (\d+) tokens in ([\d.]+) s", log)
    if int(prefill.group(1)) != tokens:
        raise UsageError(f"the prompt is {prefill.group(1)} tokens, not {tokens}")
    memory = re.search(r"\|\s*[\d.]+ M \| ([\d.]+) MB \| ([\d.]+) MB \| (\d+) MB \|", log)
    return {"load_s": float(re.search(r"Loaded .* in ([\d.]+) s", log).group(1)),
            "prefill_tok_s": tokens / float(prefill.group(2)), "model_gb": float(memory.group(1)) / 1e3,
            "kv_gb": float(memory.group(2)) / 1e3, "peak_gb": float(memory.group(3)) / 1e3}


def llamacpp(gguf: Path, ids: list, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", LLAMACPP_CHILD, str(gguf), json.dumps(ids), str(threads)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise UsageError(f"llama.cpp failed on {gguf}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--folder", type=Path, required=True, help="a random_model.py folder (model.pth, model.f16.gguf)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--widths", default="bf16,int8,int4", help="which of bf16, int8, int4")
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--prompt_tokens", type=int, default=512)
    bench.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    def run(_):
        missing = [name for name in ("model.pth", "model.f16.gguf", "tokenizer.json") if not (args.folder / name).exists()]
        if missing:
            raise UsageError(f"{args.folder} has no {', '.join(missing)}; write one with scripts/random_model.py "
                             "--shape SHAPE --gguf (see this script's --help)")
        from tokenizer import load_tokenizer
        from tqdm import tqdm

        tokenizer = load_tokenizer(args.folder)
        text = " ".join(["alpha beta gamma delta"] * (args.prompt_tokens // 4))
        ids = tokenizer.encode(text)
        rows = {}
        widths = [w for w in args.widths.split(",") if (args.folder / PAIRS[w][0]).exists()]
        for run_index in tqdm(range(args.runs), desc="runs", unit="run"):
            for width in widths:
                checkpoint, kind = PAIRS[width]
                rows.setdefault(f"ours {width}", []).append(ours(args.folder / checkpoint, text, len(ids)))
                rows.setdefault(f"llama.cpp {kind}", []).append(llamacpp(llamacpp_gguf(args.folder, kind), ids,
                                                                          args.threads))
        print(f"{args.folder.name}: {len(ids)}-token prompt, medians of {args.runs} runs, rows alternating")
        print("| row | load s | prefill tok/s | peak GB | model GB (ours) / resident GB (llama.cpp) | file GB |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, runs in rows.items():
            median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            width = name.split()[-1]
            file = args.folder / (PAIRS[width][0] if name.startswith("ours") else
                                  llamacpp_gguf(args.folder, width).name)
            held = median.get("model_gb", median.get("rss_gb"))
            print(f"| {name} | {median['load_s']:.2f} | {median['prefill_tok_s']:.1f} | {median['peak_gb']:.2f} | "
                  f"{held:.2f} | {file.stat().st_size / 1e9:.2f} |")

    cli.run(run)


if __name__ == "__main__":
    main()
