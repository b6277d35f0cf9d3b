"""Layer streaming (generate.py --memory_budget) on a model larger than memory, next to llama.cpp's mmap run of
the same weights and the disk's and page cache's own read speeds, measured in one run.

    python scripts/random_model.py --shape llama-3-8b --dtype bfloat16 --gguf     # 14.8 GB + its F16 GGUF
    sudo python scripts/bench_streaming.py --memory_limit 12GB --budgets 8GB,10GB

Each row runs in a fresh process after the page cache is dropped. With --memory_limit (root, cgroup v1 or v2),
each row's process runs in a memory cgroup of that size: the machine as one with that much RAM, page cache
included, so a model larger than the limit is a model larger than memory. Without root the rows run as they are
(on a model larger than this machine's RAM that is the real thing). Rows:
- disk: O_DIRECT sequential read of the checkpoint (what streaming can reach at most from disk);
- page cache: the same bytes read again while cached;
- ours: generate.py --memory_budget B, greedy, --ignore_eos; decode tokens/s and its own read speed;
- llama.cpp: llama-cpp-python on the F16 GGUF, use_mmap (the default), 2 threads;
- AirLLM: with --airllm_python (the python of a venv with `pip install airllm`), on the same weights as a HF
  folder (`scripts/random_model.py --hf`); its decode time is a run of N tokens less a run of one.
"""
import importlib.util
import mmap
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import cpu_ops  # noqa: E402
import streaming  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402

DEFAULT = ROOT / "checkpoints/random-llama-3-8b-bfloat16/model.pth"
PROMPT = "The capital of France is"
LLAMACPP = """
import sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[3]), n_ctx=64, use_mmap=True, verbose=False)
tokens = llm.tokenize(sys.argv[4].encode())
llm.eval(tokens)
start = time.perf_counter()
for _ in range(int(sys.argv[2]) - 1):
    llm.eval([llm.sample(temp=0.0)])
print(f"decode {(int(sys.argv[2]) - 1) / (time.perf_counter() - start)} tok/s")
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
AIRLLM = """
import sys, time, torch
from airllm import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], device="cpu", dtype=torch.bfloat16, max_seq_len=64)
ids = model.tokenizer([sys.argv[3]], return_tensors="pt")["input_ids"]
times = {}
for new in (1, int(sys.argv[2])):  # decode time: the longer run less the one that only prefills
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, use_cache=True, return_dict_in_generate=True)
    times[new] = time.perf_counter() - start
print(f"decode {(int(sys.argv[2]) - 1) / (times[int(sys.argv[2])] - times[1])} tok/s")
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class MemoryCgroup:
    """A memory cgroup of `limit` bytes that each row's process joins (v1 or v2), or None without root."""

    def __init__(self, limit: int):
        self.limit = limit
        v1 = Path("/sys/fs/cgroup/memory")
        root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
        self.path = root / f"bench_streaming_{os.getpid()}"
        self.path.mkdir()
        (self.path / ("memory.limit_in_bytes" if root == v1 else "memory.max")).write_text(str(limit))
        self.v1 = root == v1

    def join(self):  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def reset_peak(self):
        if self.v1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self):
        try:
            self.path.rmdir()
        except OSError:
            pass


def read_speed(path: Path, size: int, direct: bool) -> float:
    """GB/s of one sequential read of the first `size` bytes, 8 MB at a time (O_DIRECT: from the disk)."""
    block = 8 << 20
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        start, done = time.perf_counter(), 0
        while done < size:
            count = os.preadv(descriptor, [buffer], done)
            if count <= 0:
                break
            done += count
        return done / (time.perf_counter() - start) / 1e9
    finally:
        os.close(descriptor)


def run_row(command: list, group) -> tuple:
    """(stdout + stderr, seconds, peak bytes) of one row's process: its cgroup's peak (page cache included), or
    without one the process's own peak resident set (VmHWM; for an mmap run that counts the mapped pages)."""
    drop_page_cache()
    if group is not None:
        group.reset_peak()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=group.join if group else None)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UsageError(f"{' '.join(command[:3])}... failed (exit {result.returncode}): {last[0][:200]}")
    own = re.search(r"VmHWM:\s+(\d+) kB", output) or re.search(r"peak memory ([0-9.]+) GB", output)
    if group is not None:
        return output, seconds, group.peak()
    if own is None:
        return output, seconds, 0
    return output, seconds, int(own.group(1)) * 1024 if "VmHWM" in own.group(0) else float(own.group(1)) * 1e9


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, benchmark = parser.add_argument_group("model"), parser.add_argument_group("benchmark")
    model.add_argument("--checkpoint_path", type=Path, default=DEFAULT,
                       help=f"the model.pth (default: {DEFAULT.relative_to(ROOT)} in the repository)")
    model.add_argument("--gguf", type=Path, default=None, help="F16 GGUF of the same weights (default: model.f16.gguf beside it)")
    model.add_argument("--hf_folder", type=Path, help="the weights as a HF folder (default: hf/ beside the checkpoint)")
    model.add_argument("--dtype", default="bfloat16", help="our rows' --dtype (the checkpoint's own: read from it "
                       "directly; another: a converted copy is written to its stream file first)")
    benchmark.add_argument("--memory_limit", type=streaming.parse_size, default=None,
                           help="run each row in a memory cgroup of this size (root; e.g. 12GB)")
    benchmark.add_argument("--budgets", default="8GB", help="comma list of --memory_budget values for our rows")
    benchmark.add_argument("--new_tokens", type=int, default=4, help="tokens per row (decode speed over all but the first)")
    benchmark.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                           help="the llama.cpp row's threads (default: the CPUs this process may use, here %(default)s)")
    benchmark.add_argument("--airllm_python", type=Path, help="python of a virtual environment with airllm installed")
    benchmark.add_argument("--skip", default="", help="comma list of rows to skip: disk, ours, llamacpp, airllm")
    args = parser.parse_args(argv)

    def run(_):
        if not args.checkpoint_path.is_file():
            raise UsageError(f"{args.checkpoint_path} not found; make it with scripts/random_model.py --gguf")
        gguf = args.gguf or next(iter(sorted(args.checkpoint_path.parent.glob("model.f*.gguf"))), Path("model.f16.gguf"))
        budgets = [streaming.parse_size(b) for b in args.budgets.split(",")]
        skip = set(args.skip.split(","))
        group = None
        if args.memory_limit:
            try:
                group = MemoryCgroup(args.memory_limit)
            except OSError as error:
                raise UsageError(f"cannot make a memory cgroup ({error.strerror}); run as root or drop --memory_limit")
        size = args.checkpoint_path.stat().st_size
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_line = (f"memory limited to {streaming.format_size(args.memory_limit)} per row by a cgroup (this machine: "
                       f"{streaming.format_size(total)})" if group else f"{streaming.format_size(total)} of RAM")
        print(f"{cpu_ops.cpu_description()}, {args.threads} threads; {memory_line}; model "
              f"{args.checkpoint_path.parent.name}: {streaming.format_size(size)}; "
              f"page cache dropped before each row: {drop_page_cache()}", file=sys.stderr)
        rows = []
        try:
            if "disk" not in skip:
                sample = min(size, 4 * 10 ** 9)
                drop_page_cache()
                disk = read_speed(args.checkpoint_path, sample, direct=True)
                read_speed(args.checkpoint_path, sample, direct=False)
                cached = read_speed(args.checkpoint_path, sample, direct=False)
                rows += [("disk, O_DIRECT sequential read", "", f"{disk:.2f} GB/s", ""),
                         ("page cache, the same bytes cached", "", f"{cached:.2f} GB/s", "")]
            if "ours" not in skip:
                for budget in budgets:
                    command = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(args.checkpoint_path),
                               "--memory_budget", str(budget), "--dtype", args.dtype, "--prompt", PROMPT, "--max_new_tokens",
                               str(args.new_tokens), "--ignore_eos", "--device", "cpu"]
                    output, seconds, peak = run_row(command, group)
                    speed = float(re.search(r"([0-9.]+) tok/s", output).group(1))
                    line = re.search(r"Streaming: .*", output).group(0)
                    streamed = re.search(r"per forward \(([^)]+)\)", line).group(1)
                    read = re.search(r"at ([0-9.]+) GB/s", line).group(1)
                    rows.append((f"ours, --memory_budget {streaming.format_size(budget)}", f"{speed:.3f}",
                                 f"{read} GB/s ({streamed} streamed per token)", streaming.format_size(peak) if peak else ""))
                    print(f"  {rows[-1]}", file=sys.stderr)
            if "llamacpp" not in skip:
                if importlib.util.find_spec("llama_cpp") is None or not gguf.is_file():
                    rows.append(("llama.cpp, mmap", "not run", "llama-cpp-python or the GGUF is missing", ""))
                else:
                    output, seconds, peak = run_row([sys.executable, "-c", LLAMACPP, str(gguf), str(args.new_tokens),
                                                     str(args.threads), PROMPT], group)
                    speed = float(re.search(r"decode ([0-9.e-]+) tok/s", output).group(1))
                    rows.append((f"llama.cpp {gguf.name.split('.')[1].upper()} GGUF, mmap (llama-cpp-python)", f"{speed:.3f}",
                                 f"{speed * gguf.stat().st_size / 1e9:.2f} GB/s if every token reads the file",
                                 streaming.format_size(peak) if peak else ""))
                    print(f"  {rows[-1]}", file=sys.stderr)
            hf_folder = args.hf_folder or args.checkpoint_path.parent / "hf"
            if "airllm" not in skip and (args.airllm_python is None or not hf_folder.is_dir()):
                rows.append(("AirLLM", "not run", "give --airllm_python (a venv with `pip install airllm`) and the "
                             "weights as a HF folder (scripts/random_model.py --hf)", ""))
            elif "airllm" not in skip:
                output, seconds, peak = run_row([str(args.airllm_python), "-c", AIRLLM, str(hf_folder),
                                                 str(args.new_tokens), PROMPT], group)
                speed = float(re.search(r"decode ([0-9.e-]+) tok/s", output).group(1))
                version = subprocess.run([str(args.airllm_python), "-c", "import importlib.metadata as m; "
                                          "print(m.version('airllm'))"], capture_output=True, text=True).stdout.strip()
                rows.append((f"AirLLM {version}, HF folder (its own venv)", f"{speed:.3f}", "",
                             streaming.format_size(peak) if peak else ""))
                print(f"  {rows[-1]}", file=sys.stderr)
        finally:
            if group is not None:
                group.remove()
        print(f"| row | decode tok/s | read speed | peak memory{' (cgroup)' if group else ' (process)'} |\n|---|---:|---|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")

    cli.run(run)


if __name__ == "__main__":
    main()
