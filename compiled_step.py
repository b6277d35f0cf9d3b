"""The CPU decode step compiled without making anyone wait: built by a separate process while the eager step
decodes, swapped in between two tokens, saved next to the checkpoint and loaded by later runs.

    model.setup_caches(batch_size, cache_length(prompt + new tokens, context))
    background = BackgroundCompile(model, checkpoint_path, batch_size, sampling_options, "auto", command).start()
    generate.generate(model, prompt, n, background=background)  # eager tokens until a compiled step is ready

`command` is `generate.py --compile_only ...` (build_stages). Stages, each swapped in when it is ready:
"regional" (one transformer block compiled for every layer: about 30 s cold on 2 cores, a stopgap built with
each path's default) then "whole" (the step as one C++ graph through inductor's C++ wrapper, with the kernel
paths measured on this machine: 2-5 minutes cold, the fastest step). Each is `torch.compile(...).aot_compile`:
traced with fake tensors and serialized (save_compiled_function) into `<checkpoint dir>/compiled/`.

A separate process, not a thread: a compiler thread holds the GIL that the eager step needs between its ops
(measured: no compiled step after 300 s). It runs at the lowest priority; while the step is eager we decode
on one thread so that it has a core, then on all of them, and it builds on in idle time.

A saved step holds no weights (they stay inputs of the graph). Its file name hashes what the step computes:
every tensor's name, shape and dtype (quantization, batch size and KV cache length among them), the config,
the stage and the sampling settings. Inside, a JSON line records what it was built with (torch, Python, the
CPU's model and flags, our native kernels' source): a step from another torch or CPU, or one that does not
load, is rebuilt, with one line saying why. The file also carries the C++ binaries inductor compiled for the
step (portable_cpp_cache): another checkout or virtual environment of the same torch, or an emptied inductor
cache (/tmp after a reboot), loads it in seconds instead of compiling its C++ again. The step keeps only dynamo's global-state guard (grad mode and the
like; global_state_guards_only): the name and that record are what say a step fits, and next_step falls back to
eager if the cache is resized.
"""
import atexit
import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

import cpu_ops
import decode_kernels
import quantize
import sampling

STAGES = {"auto": ("regional", "whole"), "regional": ("regional",), "whole": ("whole",)}
MAGIC = b"gpt-fast compiled decode step 2\n"  # the file format's name and version (2: with its C++ binaries)
STEP_VERSION = 4  # in the digest: steps built by an older build_step (more guards, size asserts, a block's weights one by one) are built again
# A saved step's loader starts after this much eager decoding: a short answer (SmolLM2: "The capital of France is
# Paris.", 8 tokens in 0.45 s eager on 2 cores) ends before it and runs as a first run does; a long one takes the
# compiled step this much later (2.2 s of loading, eager at ~18 tok/s against ~75 compiled: ~0.4 s lost).
LOAD_AFTER_S = 0.5
CACHE_ROUNDING = 256  # KV cache lengths are rounded up to a multiple: one saved step serves every short prompt


def cache_length(needed: int, context: int) -> int:
    """The KV cache length for a compiled run that needs `needed` positions: rounded up, within the context."""
    return max(needed, min(-(-needed // CACHE_ROUNDING) * CACHE_ROUNDING, context))


TORCH_ROOTS = sorted({os.path.dirname(torch.__file__), os.path.dirname(os.path.realpath(torch.__file__))},
                     key=len, reverse=True)
CPP_SOURCES = ("cpp", "main.cpp", "optimized.cpp")  # the extensions of the files inductor compiles with g++
compiled_sources: list = []  # (extension, path) of every C++ source inductor wrote or found in this process


def portable_cpp_cache():
    """Make inductor's compiled C++ findable from any environment of this torch version, and record it.

    Inductor names each compiled file after a hash of its source and of the compiler's command line, and the
    command line holds this torch install's path (-I.../site-packages/torch/include): another checkout or
    virtual environment of the same torch missed the cache and compiled everything again (about 10 s for the
    regional step, 1-2 minutes for the whole one on 2 cores). Hashing the command line with that path replaced
    by a placeholder gives the same names everywhere (the torch version and CPU are checked by load_step, the
    rest of the command line by cpp_environment).

    Also: before it looks for the compiled file, inductor runs the preprocessor over its precompiled header to
    hash it, for every kernel (about 1 s each, and with an empty cache the header is compiled too); where the
    file is already there nothing is compiled and that header is never used, so it is skipped then.
    Installed once; it changes only names and skips work whose result is not used."""
    from torch._inductor import codecache

    if getattr(codecache.write, "portable", False):
        return
    original_write, original_precompile = codecache.write, codecache._precompile_header

    def write(content, extension, extra="", *args, **kwargs):
        if extension in CPP_SOURCES:
            for root in TORCH_ROOTS:
                extra = extra.replace(root, "<torch>")
        basename, path = original_write(content, extension, extra, *args, **kwargs)
        if extension in CPP_SOURCES:
            compiled_sources.append((extension, path))
        return basename, path

    def precompile_header(*args, **kwargs):
        if compiled_sources and all(Path(file).exists() for file in targets_of_last_sources()):
            return os.devnull  # nothing will be compiled: the header's path is never read
        return original_precompile(*args, **kwargs)

    write.portable = True
    codecache.write, codecache._precompile_header = write, precompile_header


def targets_of_last_sources() -> list:
    """What inductor builds for the library whose sources it wrote last (CppCodeCache.load_async writes
    main.cpp, then optimized.cpp if there is separate kernel code, then precompiles headers): main.so; or
    main.o, optimized.o and main.so linked from them."""
    extension, path = compiled_sources[-1]
    if extension == "main.cpp":
        return [Path(path).with_suffix(".so")]
    if extension == "optimized.cpp" and len(compiled_sources) > 1 and compiled_sources[-2][0] == "main.cpp":
        main = Path(compiled_sources[-2][1])
        return [main.with_suffix(".o"), Path(path).with_suffix(".o"), main.with_suffix(".so")]
    return [Path(os.devnull, "none")]  # not a library inductor loads: precompile as usual


def cpp_environment() -> str:
    """What else names inductor's compiled C++ here (its command line without torch's path): the Python headers
    and libraries and the compiler. A step saved where these differ is left to the build process."""
    from torch._inductor import config

    return json.dumps([sysconfig.get_paths()["include"], sysconfig.get_config_var("LIBDIR"), config.cpp.cxx])


def binaries_of(sources: list) -> list:
    """(path relative to inductor's cache folder, bytes) of the compiled files of these C++ sources."""
    from torch._inductor.codecache import cache_dir

    root, found = Path(cache_dir()), {}
    for _, source in sources:
        for binary in (Path(source).with_suffix(".so"), Path(source).with_suffix(".o")):
            if binary.exists() and binary.is_relative_to(root):
                found[str(binary.relative_to(root))] = binary.read_bytes()
    return sorted(found.items())


def restore_binaries(binaries: list):
    """Put a step's compiled files into inductor's cache folder where they are missing (atomically)."""
    from torch._inductor.codecache import cache_dir

    root = Path(cache_dir())
    for name, data in binaries:
        target = root / name
        if ".." in Path(name).parts or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{os.getpid()}.{target.name}.tmp")
        temporary.write_bytes(data)
        temporary.chmod(0o755)
        os.replace(temporary, target)


def build_identity() -> dict:
    """What a compiled step was built with: another value of any of these means building it again."""
    return {**cpu_ops.machine_identity(), "python": platform.python_version()}


def step_digest(model: torch.nn.Module, stage: str, sampling_options: dict) -> str:
    """A short hash of what the step computes (see the module's docstring)."""
    tensors = [(name, list(t.shape), str(t.dtype)) for name, t in [*model.named_parameters(), *model.named_buffers()]]
    text = json.dumps([STEP_VERSION, stage, model.args.to_dict(), sampling_options, tensors], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def artifact_path(checkpoint_path: Path, stage: str, digest: str) -> Path:
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.parent / "compiled" / f"{checkpoint_path.stem}.{stage}.{digest}.pt2"


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def load_step(path: Path, same_environment_only: bool):
    """(the compiled step saved at path, None) or (None, a note why it is not used; None when there is none).
    same_environment_only: None, quietly, for a step whose C++ would not be found here (another Python or
    compiler, cpp_environment): loading it would compile its C++ again, a job for the build process."""
    if not path.exists():
        return None, None
    try:
        with open(path, "rb") as file:
            if file.readline() != MAGIC:
                raise ValueError("not a compiled step file (or one of an older format)")
            header = json.loads(file.readline())
            built_with, environment = dict(header["identity"]), header["environment"]
            step_bytes = file.read(header["step_bytes"])
            binaries = [(name, file.read(size)) for name, size in header["binaries"]]
            if len(step_bytes) != header["step_bytes"] or any(len(data) != size for (_, data), (_, size)
                                                               in zip(binaries, header["binaries"])):
                raise ValueError("the file is truncated")
    except Exception as error:
        return None, f"compiled step {path} is unreadable ({first_line(error)}); building it again"
    here = build_identity()
    differs = [key for key in here if built_with.get(key) != here[key]]
    if differs:
        what = ", ".join(f"{key} {built_with.get(key)!r}" if key != "flags" else "other CPU flags" for key in differs)
        return None, f"compiled step {path} was built with {what}; building it again for this machine"
    if same_environment_only and environment != cpp_environment():
        return None, None
    try:
        cpu_ops.load()  # the step may call our native kernels: their operators must be registered
        portable_cpp_cache()
        restore_binaries(binaries)
        return checked_by_the_caller(torch.compiler.load_compiled_function(io.BytesIO(step_bytes))), None
    except Exception as error:
        return None, f"compiled step {path} does not load ({first_line(error)}); building it again"


def checked_by_the_caller(step):
    """The step with its guard (global state only: global_state_guards_only) checked by
    BackgroundCompile.next_step before each token (`step.global_state_holds()`) instead of in its own call,
    which binds the call's arguments to the traced function's signature first (inspect.Signature.bind: ~60 us
    of a 3.7 ms int4 SmolLM2 token). Left as it is where this torch's compiled function lacks what it takes."""
    manager = getattr(getattr(step, "_artifacts", None), "guard_manager", None)
    try:
        manager.check({})  # the global-state guard reads no argument
    except Exception:
        return step
    step.disable_guard_check()
    step.global_state_holds = lambda: manager.check({})
    return step


def save_step(step, path: Path, sources: list = ()):
    """Write atomically: a line naming the format, a JSON line of what it was built with, the step's bytes,
    then the compiled files of `sources` (the C++ the step was built or loaded with: compiled_sources)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".saving-") as folder:
        step.save_compiled_function(os.path.join(folder, "step"))
        step_bytes, binaries = Path(folder, "step").read_bytes(), binaries_of(sources)
        header = {"identity": build_identity(), "environment": cpp_environment(), "step_bytes": len(step_bytes),
                  "binaries": [(name, len(data)) for name, data in binaries]}
        with open(os.path.join(folder, "artifact"), "wb") as file:
            file.write(MAGIC + json.dumps(header).encode() + b"\n" + step_bytes)
            for _, data in binaries:
                file.write(data)
        os.replace(os.path.join(folder, "artifact"), path)


def global_state_guards_only(guard_entries) -> list:
    """dynamo's guard filter for a saved step. The ~400 tensor guards that keep_portable_guards_unsafe would keep
    (one per weight and cache tensor, reached through the modules' dicts) cost about 1 ms a token (measured,
    int4 SmolLM2, 2 Zen 4 cores: 8.1 vs 6.9 ms), and the file's name already pins every tensor's shape and dtype."""
    return [entry.guard_type == "GLOBAL_STATE" for entry in guard_entries]


def build_step(model: torch.nn.Module, stage: str, batch_size: int, sampling_options: dict):
    """sampling.decode_one_token compiled ahead of time for this model: "regional" or "whole" (decode_kernels.py)."""
    device = model.norm.weight.device
    example = (model, torch.zeros(batch_size, 1, dtype=torch.long, device=device),
               torch.zeros(1, dtype=torch.long, device=device))
    # No size asserts: the generated wrapper checked every input's sizes and strides on every call (580 checks a
    # SmolLM2 token), which the file name's digest of every tensor's shape already vouches for.
    options = {"guard_filter_fn": global_state_guards_only, "cpp_wrapper": stage == "whole", "size_asserts": False}
    # The blocks are RegionBlocks for both stages; "whole" inlines the regions into one graph.
    with torch.no_grad(), torch._dynamo.config.patch(inline_invoke_subgraph=stage == "whole"):
        compiled = torch.compile(sampling.decode_one_token, fullgraph=True, options=options)
        return compiled.aot_compile((example, dict(sampling_options)))


def lowest_priority():
    """The build process (and the C++ compilers it starts) runs only on cores nothing else wants."""
    os.setpriority(os.PRIO_PROCESS, 0, 19)


class FileLock:
    """An flock on a file: exclusive while the build process times a kernel path, shared (and at once released)
    by the decoding process between two tokens, so that neither the timing nor the tokens share the cores."""

    def __init__(self, path: Path, shared: bool = False):
        self.path, self.shared, self.file = Path(path), shared, None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def build_stages(model, checkpoint_path: Path, batch_size: int, sampling_options: dict, mode: str = "auto",
                 log=print):
    """What the build process does (generate.py --compile_only): each stage of `mode` loaded if saved and
    fitting this machine, else built and saved; the kernel paths measured first (unless cached)."""
    decode_kernels.swap_decode_modules([model], "regional")
    portable_cpp_cache()
    folder = Path(checkpoint_path).parent / "compiled"
    cpu_ops.MEASURING = FileLock(folder / ".measuring.lock")  # a decoding process waits while we time
    chosen = False
    stages = STAGES[mode]
    for stage in stages:
        path = artifact_path(checkpoint_path, stage, step_digest(model, stage, sampling_options))
        start = time.perf_counter()
        seen = len(compiled_sources)
        step, note = load_step(path, same_environment_only=False)
        if note:
            log(note)
        if step is None:
            # An earlier stage is a stopgap, built with each path's default at once; the last one is built with
            # the paths measured on this machine (the first measurement compiles 5-10 small graphs: 20-30 s cold).
            if not chosen and stage == stages[-1]:
                choose_paths(model)
                chosen = True
            seen = len(compiled_sources)
            step = build_step(model, stage, batch_size, sampling_options)
        # The ISA checks ("cpp", once a process) and what this stage compiled or loaded. Saved again when loaded:
        # the file then records this environment.
        sources = [entry for entry in compiled_sources[:seen] if entry[0] == "cpp"] + compiled_sources[seen:]
        save_step(step, path, sources)
        log(f"compiled step {stage}: {path} ({time.perf_counter() - start:.1f} s)")


def choose_paths(model):
    """Each layer's one-token path under compile, measured on this machine (cached: cpu_ops.KernelChoices)."""
    choices = cpu_ops.KernelChoices()
    decode_kernels.choose_float_paths([model], choices)
    decode_kernels.choose_attention_paths([model], choices)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    quantize.choose_compiled_paths([model], dtype, choices)
    decode_kernels.choose_block_paths([model], choices)


class BackgroundCompile:
    """The compiled decode step for `model` (its KV cache already set up), without waiting for the compiler.

    start(): the best saved stage whose C++ fits here is loaded at once (a warm start: seconds); the
    stages still missing are built by `command`, a separate process (generate.py --compile_only: its own
    interpreter, so the compiler does not hold our GIL), while this one decodes eagerly. The decode loop asks
    `next_step()` before each token: ("eager", the eager step) until a stage is ready, then (stage, its step),
    loading each stage the build process has saved as soon as it appears. `notes`: one line per thing a user
    should know. stop() ends the build process (what it finished stays saved)."""

    POLL_S = 0.25

    def __init__(self, model, checkpoint_path: Path, batch_size: int, sampling_options: dict, mode: str = "auto",
                 command: Optional[list] = None):
        decode_kernels.swap_decode_modules([model], "regional")  # eager computation is unchanged
        self.model, self.command = model, command
        self.cache_size = (model.max_batch_size, model.max_seq_length)
        self.stages = STAGES[mode]
        self.paths = {stage: artifact_path(checkpoint_path, stage, step_digest(model, stage, sampling_options))
                      for stage in self.stages}
        self.lock_path = Path(checkpoint_path).parent / "compiled" / ".measuring.lock"
        self.eager = ("eager", sampling.decode_one_token)
        self.current = self.eager
        self.ready = {}  # stage -> (seconds after start, "loaded" | "built")
        self.notes = []
        self.process, self.log_path = None, None
        self.threads = torch.get_num_threads()
        self.tried = {}  # stage -> the modification time of the saved file last tried
        self.started = self.polled = 0.0
        self.loader, self.loaded = None, None  # start(load_in_thread=True): the thread, and what it loaded
        self.decoding_since = None

    def start(self, load_in_thread: bool = False) -> "BackgroundCompile":
        """load_in_thread: a saved step is loaded beside the eager decode (next_step takes it when loaded)
        instead of before it: loading takes 2-2.5 s (dynamo's deserialization, inductor's imports and its probes
        of the CPU's vector instructions, child processes that leave the GIL free), longer than a short eager
        answer, so a short run is never slower for having a saved step."""
        self.started = time.perf_counter()
        if load_in_thread and any(path.exists() for path in self.paths.values()):
            # Started by next_step once the eager decode has run LOAD_AFTER_S: the prefill's large products want
            # every core, and an answer that ends sooner never meets the loader (whose GIL slows eager steps).
            self.loader = threading.Thread(target=self.load_saved, name="compiled step loader", daemon=True)
            return self
        self.load_saved()
        self.take_loaded()
        return self

    def load_saved(self):
        """The best stage saved by this environment, into self.loaded (what a loader thread may touch)."""
        for stage in reversed(self.stages):
            step, note = load_step(self.paths[stage], same_environment_only=True)
            if note:
                self.notes.append(note)
            if step is not None:
                self.loaded = (stage, step, time.perf_counter() - self.started)
                return

    def take_loaded(self):
        """Use what load_saved found, then build what is still missing."""
        if self.loaded is not None:
            stage, step, seconds = self.loaded
            self.current, self.ready[stage], self.loaded = (stage, step), (seconds, "loaded"), None
        if self.current[0] != self.stages[-1] and self.command:
            self.log_path = self.paths[self.stages[-1]].parent / "build.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "w") as log:
                self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, preexec_fn=lowest_priority)
            atexit.register(self.stop)  # however this process ends (Ctrl-C, an error), the build ends too

    def next_step(self):
        if self.loader is not None and self.loader.ident is None:
            self.decoding_since = self.decoding_since or time.perf_counter()
            if time.perf_counter() - self.decoding_since >= LOAD_AFTER_S:
                self.loader.start()  # a daemon: a run that ends first does not wait for it
        elif self.loader is not None and not self.loader.is_alive():
            self.loader = None
            self.take_loaded()
        if self.process is not None:
            with FileLock(self.lock_path, shared=True):  # waits while the build process times a kernel path
                pass
            if time.perf_counter() - self.polled > self.POLL_S:
                self.polled = time.perf_counter()
                self.poll()
        # While the step is eager, the build gets a core of its own; once a compiled step runs, decoding takes
        # every core and the build, at the lowest priority, runs when we are idle (between prompts).
        busy = self.process is not None or self.loader is not None  # a second job on the cores
        threads = 1 if busy and self.current is self.eager else self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (self.model.max_batch_size, self.model.max_seq_length) != self.cache_size:
            return self.eager  # the cache was resized: the compiled step assumes its shapes
        holds = getattr(self.current[1], "global_state_holds", None)
        if holds is not None and not holds():
            return self.eager  # grad mode and the like, other than the step was compiled for
        return self.current

    def poll(self):
        """Load the best stage the build process has saved since we started, if better than ours."""
        exited = self.process.poll() is not None
        better = self.stages[self.stages.index(self.current[0]) + 1:] if self.current[0] in self.stages else self.stages
        for stage in reversed(better):
            path = self.paths[stage]
            saved_at = path.stat().st_mtime if path.exists() else None
            if saved_at is not None and saved_at >= self.wall_started() and self.tried.get(stage) != saved_at:
                self.tried[stage] = saved_at
                step, note = load_step(path, same_environment_only=False)
                if note:
                    self.notes.append(note)
                if step is not None:
                    self.use(stage, step, "built")
                    break
        if exited:
            if self.process.returncode and self.current[0] != self.stages[-1]:
                self.notes.append(f"the background compile failed (exit code {self.process.returncode}; "
                                  f"see {self.log_path}); decoding keeps the {self.current[0]} step")
            self.process = None

    def wall_started(self) -> float:
        return time.time() - (time.perf_counter() - self.started)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until the build process has finished and its last stage is loaded; False if still building."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while self.process is not None and (deadline is None or time.perf_counter() < deadline):
            time.sleep(self.POLL_S)
            self.poll()
        return self.process is None

    def stop(self):
        torch.set_num_threads(self.threads)
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)  # as Ctrl-C: it cleans up (a half-built extension's lock file)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def use(self, stage: str, step, how: str):
        self.current = (stage, step)
        self.ready[stage] = (time.perf_counter() - self.started, how)

    def summary(self, stages: list) -> str:
        """'Compiled step: tokens 2-9 eager, 10-200 regional (built 31.0 s after start); whole building' for
        the stages the decode loop used, token by token (the first token comes from the eager prefill)."""
        runs, start = [], 0
        for i in range(1, len(stages) + 1):
            if i == len(stages) or stages[i] != stages[start]:
                span = f"{start + 2}" if i - 1 == start else f"{start + 2}-{i + 1}"
                seconds, how = self.ready.get(stages[start], (None, None))
                when = f" ({how} {seconds:.1f} s after start)" if seconds is not None else ""
                runs.append(f"{span} {stages[start]}{when}")
                start = i
        best = self.stages.index(self.current[0]) if self.current[0] in self.stages else -1
        pending = list(self.stages[best + 1:])
        tail = f"; {', '.join(pending)} {'building' if self.process is not None else 'not built'}" if pending else ""
        if self.loader is not None:
            tail = "; the saved step still loading" if self.loader.ident else "; the saved step not needed (a short answer)"
        return f"Compiled step: tokens {', '.join(runs) or 'none decoded'}{tail}"
