"""Native CPU kernels for quantized products, and the measured choice between them and the other paths.

cpu_ops.cpp holds integer dot-product kernels (int8 and 4-bit weights times activations quantized to int8 in
blocks of 32, as llama.cpp computes them). They are compiled at first use with torch.utils.cpp_extension for
the CPU at hand (-march=native, so AVX2 or VNNI instructions as it has them) and cached by torch. A machine
without a compiler, or where the build fails, gets one warning line and the pure-PyTorch paths.

No path is assumed fastest: `KernelChoices` times every candidate a quantized layer offers (quantize.py) for
each shape and number of rows on the running machine, keeps the fastest, and caches the result on disk keyed by
the CPU's model and flags and the torch version; a file that is corrupt or from another CPU is measured again.
"""
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
BLOCK = 32  # the activation quantization block (cpu_ops.cpp's BLOCK)
_loaded: Optional[bool] = None  # None: not tried yet in this process
_loading = threading.Lock()  # a compiled step's loader thread may ask while the decode loop does
STALE_BUILD_LOCK_S = 600  # a build takes 30-60 s; a lock file this old belongs to a build that died


def cpu_flags() -> list:
    """The x86 feature flags that decide which instructions a kernel may use (empty off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    """'AMD EPYC (avx2, fma, f16c)': the CPU and the flags that matter to our kernels, for tables and logs."""
    flags = set(cpu_flags())
    return f"{cpu_name()} ({', '.join(f for f in SIMD_FLAGS if f in flags) or 'no AVX2'})"


if hasattr(torch.library, "register_fake"):
    def _register_fakes():
        """Output shapes for torch.compile: the kernels are opaque calls in the compiled graph."""
        torch.library.register_fake("gptfast_cpu::int8_linear")(
            lambda x, tiles, scales, groupsize, out_features: x.new_empty(x.shape[0], out_features))
        torch.library.register_fake("gptfast_cpu::int4_linear")(
            lambda x, tiles, d, m, groupsize, out_features: x.new_empty(x.shape[0], out_features))
        torch.library.register_fake("gptfast_cpu::int8_weight_rows")(
            lambda tiles, scales, groupsize, K, N, n_begin, n_end, dtype: tiles.new_empty(n_end - n_begin, K, dtype=dtype))
        torch.library.register_fake("gptfast_cpu::int4_weight_rows")(
            lambda tiles, d, m, groupsize, K, N, n_begin, n_end, dtype: tiles.new_empty(n_end - n_begin, K, dtype=dtype))
        torch.library.register_fake("gptfast_cpu::float_linear")(
            lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0]))
        torch.library.register_fake("gptfast_cpu::int8_gated_linear")(
            lambda x, gate_tiles, gate_scales, up_tiles, up_scales, groupsize, out_features:
            x.new_empty(x.shape[0], out_features))
        torch.library.register_fake("gptfast_cpu::int4_gated_linear")(
            lambda x, gate_tiles, gate_d, gate_m, up_tiles, up_d, up_m, groupsize, out_features:
            x.new_empty(x.shape[0], out_features))
        torch.library.register_fake("gptfast_cpu::decoder_block")(lambda h, *rest, **scales: h.new_empty(h.shape))
        torch.library.register_fake("gptfast_cpu::float_gated_linear")(
            lambda x, gate_weight, up_weight: x.new_empty(x.shape[0], gate_weight.shape[0]))
        torch.library.register_fake("gptfast_cpu::attention")(lambda q, k, v, mask, *scales: q.new_empty(q.shape))  # contiguous
else:  # torch < 2.4
    def _register_fakes():
        pass


def load() -> bool:
    """Build (first time on this CPU) and load the native kernels; False, with one warning, when they cannot be."""
    with _loading:
        return _load()


def _load() -> bool:
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("GPT_FAST_NO_NATIVE") == "1":
        return False
    # The build's name hashes the source, the CPU's flags and torch's version: another CPU gets its own build.
    # GPT_FAST_NATIVE_FLAGS ("-march=haswell", "-march=x86-64") builds for an older CPU than this one: how the
    # AVX2 and plain C++ branches are tested on a machine that would build its own.
    target = os.environ.get("GPT_FAST_NATIVE_FLAGS", "-march=native").split()
    key = hashlib.sha1(SOURCE.read_bytes() + " ".join(cpu_flags()).encode() + torch.__version__.encode()
                       + " ".join(target).encode())
    name = f"gptfast_cpu_{key.hexdigest()[:12]}"
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # pip's ninja, in a virtual environment that is not activated
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        start = time.perf_counter()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        first_build = not any(build_dir.glob("*.so"))
        baton = build_dir / "lock"  # left behind by a build that was killed, it would make every later one wait
        if baton.exists() and time.time() - baton.stat().st_mtime > STALE_BUILD_LOCK_S:
            baton.unlink(missing_ok=True)
        built = build_dir / f"{name}.so"
        if built.exists() and not baton.exists():
            # Built before, by this or another virtual environment of the same torch (the name says so): loaded
            # as it is. Through cpp_extension.load, ninja would compile it again from another environment, whose
            # command line names its own torch's include paths, and again back here: 25 s each time.
            torch.ops.load_library(str(built))
        else:
            if first_build:
                print("building the native CPU kernels for this machine (once, about 30 s)...", file=sys.stderr)
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", *target, "-fopenmp"],
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        if first_build:
            print(f"native CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        _register_fakes()  # here, eagerly: a first call to ops() may come while torch.compile traces
        _loaded = True
    except Exception as error:  # no compiler, no ninja, an unsupported CPU: the PyTorch paths still work
        reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else type(error).__name__
        warnings.warn(f"native CPU kernels unavailable, using PyTorch's ({reason})", stacklevel=2)
    return _loaded


def ops():
    """torch.ops.gptfast_cpu once loaded (call load() first)."""
    return torch.ops.gptfast_cpu


TILE = 16  # output channels interleaved in the kernels' layouts (cpu_ops.cpp's TILE)


def by_tile(per_channel: Tensor) -> Tensor:
    """[N (a multiple of TILE), groups] -> [tile, group, channel]: a tile's 16 scales of a group side by side."""
    return per_channel.reshape(-1, TILE, per_channel.shape[-1]).transpose(1, 2).contiguous()


def padded_to_tiles(*tensors: Tensor):
    """Channels (dim 0) padded with zeros to a whole number of tiles."""
    return [torch.nn.functional.pad(t, (0, 0, 0, -t.shape[0] % TILE)) for t in tensors]


def int8_tiles(weight: Tensor, scales: Tensor):
    """int8 weights [N, K] and float32 scales [N, groups] in the kernel's layout (cpu_ops.cpp's int8_tile_rows):
    per tile of 16 channels and block of 32 inputs, 8 vectors of [channel][4 bytes], byte k of vector j holding
    input 4j + k; scales [tile, group, channel]."""
    in_features = weight.shape[1]
    weight, scales = padded_to_tiles(weight, scales.float().reshape(weight.shape[0], -1))
    packed = weight.reshape(-1, TILE, in_features // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)  # [tile, block, j, channel, k]
    return packed.contiguous().reshape(-1), by_tile(scales)


def int4_tiles(q: Tensor, scales: Tensor, zeros: Tensor):
    """Our int4 layer ((q - 8) * scale + zero, q [N, K] in 0..15) in the kernel's layout (cpu_ops.cpp's
    int4_tile_rows): channels in tiles of 16 (the last padded with zeros); per tile and block of 32 inputs, 4
    vectors of [channel][4 bytes], byte k of vector j holding input 4j + k in its low nibble and 16 + 4j + k in
    its high one; d = scale and m = zero - 8 * scale in float16, [tile, group, channel]."""
    in_features = q.shape[1]
    q, d, m = padded_to_tiles(q.to(torch.uint8), scales.half(), (zeros - 8 * scales).half())
    q = q.reshape(-1, TILE, in_features // BLOCK, 2, 4, 4)  # [tile, channel, block, nibble, j, k]
    packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [tile, block, j, channel, k]
    return packed.contiguous().reshape(-1), by_tile(d), by_tile(m)


def quantized_activations(x: Tensor):
    """What the kernels do to their input, in PyTorch (the tests' reference): x [rows, K] -> (q, scale) with
    x ≈ q * scale per block of 32, q int8 in [-127, 127] (as float32 [rows, K/32, 32]), scale [rows, K/32, 1]."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(scale > 0, 1 / scale, torch.zeros_like(scale)))
    return q, scale


# ---------------------------------------------------------------- measured choice


def describe_paths(paths: dict, buckets) -> str:
    """'native (1 row), native (2-8 rows), aten (64 rows)' for a layer's {rows: path} over `buckets` (the numbers
    of rows timed; the last stands for every longer input), runs of equal paths merged."""
    if not paths:
        return "default"
    parts, rows = [], [r for r in buckets if r in paths]
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or paths[rows[i]] != paths[rows[start]] or rows[i] == buckets[-1]:
            span = str(rows[start]) if i - 1 == start else f"{rows[start]}-{rows[i - 1]}"
            span = "longer inputs" if rows[start] == buckets[-1] else f"{span} row{'s' if span != '1' else ''}"
            parts.append(f"{paths[rows[start]]} ({span})")
            start = i
    compiled = f"compiled 1 row: {paths['compiled']}; " if "compiled" in paths else ""
    return compiled + ", ".join(parts)



def cache_path() -> Path:
    root = os.environ.get("GPT_FAST_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "gpt-fast-native")
    return Path(root).expanduser() / "kernel_choices.json"


def machine_identity() -> dict:
    """What measured choices and compiled code depend on: the CPU (model and flags), torch, our native source."""
    return {"cpu": cpu_name(), "flags": " ".join(cpu_flags()), "torch": torch.__version__,
            "native": SOURCE.exists() and hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:12]}


# Held while a candidate is timed. A decode loop running beside a background measurement (compiled_step.py)
# waits for it between two tokens, so that neither the timing nor the tokens share the cores.
MEASURING = threading.Lock()


def time_call(fn: Callable, budget_s: float = 0.02) -> float:
    """Median microseconds of one call, over calls filling about `budget_s` (after a warm-up)."""
    fn()  # a first call may compile: outside the lock
    with MEASURING:
        for _ in range(3):
            fn()
        samples = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


_graph_call_us: Optional[float] = None


def time_compiled(fn: Callable, *inputs) -> float:
    """Microseconds of `fn(*inputs)` compiled by inductor (fullgraph, static shapes), less the cost of calling
    any compiled graph: in the decode step the code is one part of one graph, and that cost is paid once."""
    global _graph_call_us
    import torch._dynamo

    # Every timed closure is a new entry for dynamo's cache of this code object; let them all compile.
    with torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16):
        if _graph_call_us is None:
            empty = torch.compile(lambda x: x + 1, fullgraph=True, dynamic=False)
            _graph_call_us = time_call(lambda: empty(torch.zeros(1)))
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        return max(time_call(lambda: compiled(*inputs)) - _graph_call_us, 0.0)


def time_compiled_alternately(candidates: dict, *inputs, rounds: int = 7) -> dict:
    """{name: microseconds} of each `candidates[name](*inputs)` compiled, timed in turns (A, B, A, B, ...) and
    the median of each one's rounds taken: on a shared VM two timings a second apart differed 2x (measured),
    which a comparison of whole blocks, ~25% apart, cannot take one after the other."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16):
        compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in candidates.items()}
        for fn in compiled.values():
            fn(*inputs)  # compiles, outside the measuring lock
        rounds_us = {name: [] for name in compiled}
        for _ in range(rounds):
            for name, fn in compiled.items():
                rounds_us[name].append(time_call(lambda: fn(*inputs), budget_s=0.01))
    return {name: statistics.median(times) for name, times in rounds_us.items()}


class KernelChoices:
    """The fastest path per (layer kind, shape, rows) on this machine, measured once and cached in a JSON file.

    The file records the CPU (model and flags) and the torch version it was measured with; a file that does
    not parse, or that was measured elsewhere, is replaced by new measurements (one line says so)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or cache_path()
        self.identity = machine_identity()
        self.choices, self.measured = {}, 0
        try:
            data = json.loads(self.path.read_text())
            if {key: data.get(key) for key in self.identity} == self.identity:
                self.choices = dict(data["choices"])
            else:
                print(f"kernel choices in {self.path} were measured on another CPU or torch; measuring again",
                      file=sys.stderr)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            print(f"kernel choices in {self.path} are unreadable; measuring again", file=sys.stderr)

    def choose(self, key: str, timers: dict) -> str:
        """The name of the fastest candidate, measured unless cached: `timers` maps each candidate's name to a
        zero-argument function that returns its time in microseconds (time_call, time_compiled)."""
        cached = self.choices.get(key)
        measured = cached.get("us") if isinstance(cached, dict) else None
        # A choice measured before a candidate existed (a new path) is measured again with it.
        if isinstance(cached, dict) and cached.get("path") in timers and (not measured or set(timers) <= set(measured)):
            return cached["path"]
        times = {}
        for name, timer in timers.items():
            try:
                times[name] = round(timer(), 1)
            except Exception as error:  # a path this machine cannot run is not a choice here
                print(f"kernel path {name} failed for {key}: {str(error).strip().splitlines()[0][:120]}",
                      file=sys.stderr)
        if not times:
            raise RuntimeError(f"no kernel path could run {key}")
        best = min(times, key=times.get)
        self.choices[key] = {"path": best, "us": times}
        self.measured += 1
        return best

    def time_of(self, key: str, name: str) -> Optional[float]:
        """A measured time from this file (microseconds), if it has one."""
        cached = self.choices.get(key)
        return cached.get("us", {}).get(name) if isinstance(cached, dict) else None

    def save(self):
        """Write the file atomically; a cache that cannot be written only costs a measurement next time."""
        if not self.measured:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as file:
                json.dump({**self.identity, "choices": self.choices}, file, indent=1, sort_keys=True)
            os.replace(file.name, self.path)
        except OSError as error:
            print(f"could not save kernel choices to {self.path}: {error}", file=sys.stderr)
