"""compiled_step.py: the decode step built in a separate process while eager decoding runs, swapped in between
tokens, saved next to the checkpoint, loaded by later runs, and refused (with a note) when it does not fit."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import compiled_step
import generate

ROOT = Path(__file__).resolve().parent.parent
PROMPT = torch.tensor([3, 17, 42, 5, 9])
CACHE_LENGTH = 64


def tiny_model(checkpoint: Path):
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(max_batch_size=1, max_seq_length=CACHE_LENGTH)
    return model


def build_command(checkpoint: Path, mode: str = "auto") -> list:
    """What generate.py --compile_only does, for a checkpoint without a tokenizer."""
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import compiled_step, generate; "
              "model = generate.load_model(sys.argv[2], 'cpu', torch.float32); "
              f"model.setup_caches(max_batch_size=1, max_seq_length={CACHE_LENGTH}); "
              f"compiled_step.build_stages(model, sys.argv[2], 1, {{}}, {mode!r})")
    return [sys.executable, "-c", script, str(ROOT), str(checkpoint)]


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    """A copy of the tiny Llama, its eager greedy tokens, and a decode that ran while both stages were built."""
    _, _, source = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("compiled")
    checkpoint = folder / "model.pth"
    shutil.copy(source, checkpoint)
    eager = generate.generate(tiny_model(checkpoint), PROMPT, 40, max_seq_length=CACHE_LENGTH)

    model = tiny_model(checkpoint)
    background = compiled_step.BackgroundCompile(model, checkpoint, 1, {}, "auto", build_command(checkpoint)).start()

    def wait_for(stage):
        deadline = time.perf_counter() + 600
        while stage not in background.ready and time.perf_counter() < deadline:
            time.sleep(0.1)
            if background.process is not None:
                background.poll()

    def callback(token):  # hold the decode at fixed tokens until the next stage is ready: eager, regional, whole
        produced[0] += 1
        if produced[0] == 4:
            wait_for("regional")
        elif produced[0] == 12:
            assert background.wait(600), "the build process did not finish"

    produced, timings = [0], {}
    try:
        tokens = generate.generate(model, PROMPT, 40, max_seq_length=CACHE_LENGTH, callback=callback, timings=timings,
                                   background=background)
    finally:
        background.stop()
    return checkpoint, eager, tokens, timings["stages"], background


@pytest.mark.slow
def test_background_compile_gives_eager_tokens_across_stages(built):
    """Tokens decoded eager, then by the regional step, then by the whole-graph one, as each became ready,
    are exactly eager's in float32; both stages are saved next to the checkpoint."""
    checkpoint, eager, tokens, stages, background = built
    assert torch.equal(tokens, eager)
    assert stages[:3] == ["eager"] * 3 and "regional" in stages and stages[-1] == "whole"
    assert stages == sorted(stages, key=["eager", "regional", "whole"].index)  # never back to a worse step
    assert sorted(path.name.split(".")[1] for path in (checkpoint.parent / "compiled").glob("*.pt2")) == \
        ["regional", "whole"]
    assert "tokens 2-4 eager" in background.summary(stages)


@pytest.mark.slow
def test_saved_step_is_loaded_by_a_later_run(built):
    """A later run (here: another process than the one that built it) starts with the best saved stage."""
    checkpoint, eager, _, _, _ = built
    model = tiny_model(checkpoint)
    background = compiled_step.BackgroundCompile(model, checkpoint, 1, {}, "auto", command=None).start()
    assert background.current[0] == "whole" and background.ready["whole"][1] == "loaded"
    assert background.notes == []
    timings = {}
    tokens = generate.generate(model, PROMPT, 40, max_seq_length=CACHE_LENGTH, timings=timings, background=background)
    assert torch.equal(tokens, eager)
    assert set(timings["stages"]) == {"whole"}


@pytest.mark.slow
def test_a_saved_step_loads_beside_the_eager_decode(built, monkeypatch):
    """start(load_in_thread=True), what generate.py does: the first tokens are eager while a thread loads the
    saved step (a short answer does not wait 2-2.5 s for it), the later ones take it; tokens are eager's."""
    checkpoint, eager, _, _, _ = built
    monkeypatch.setattr(compiled_step, "LOAD_AFTER_S", 0.0)
    model = tiny_model(checkpoint)
    background = compiled_step.BackgroundCompile(model, checkpoint, 1, {}, "auto", command=None)
    background.start(load_in_thread=True)
    assert background.current[0] == "eager" and background.loader is not None

    def callback(token):  # hold the decode after its third token until the loader is done
        produced[0] += 1
        if produced[0] == 3:
            background.loader.join(600)

    produced, timings = [0], {}
    tokens = generate.generate(model, PROMPT, 40, max_seq_length=CACHE_LENGTH, callback=callback, timings=timings,
                               background=background)
    assert torch.equal(tokens, eager)
    assert timings["stages"][0] == "eager" and timings["stages"][-1] == "whole"
    assert background.ready["whole"][1] == "loaded" and background.notes == []
    assert "eager" in background.summary(timings["stages"]) and torch.get_num_threads() == background.threads


@pytest.mark.slow
def test_a_short_answer_never_starts_loading_the_saved_step(built, monkeypatch):
    """An answer that ends within LOAD_AFTER_S of eager decoding runs as a first run does: no loader thread
    (whose GIL would slow its eager steps), every token eager and eager's."""
    checkpoint, eager, _, _, _ = built
    monkeypatch.setattr(compiled_step, "LOAD_AFTER_S", 600.0)
    model = tiny_model(checkpoint)
    background = compiled_step.BackgroundCompile(model, checkpoint, 1, {}, "auto", command=None)
    background.start(load_in_thread=True)
    timings = {}
    tokens = generate.generate(model, PROMPT, 6, max_seq_length=CACHE_LENGTH, timings=timings, background=background)
    background.stop()  # as generate.py does: the decode's thread count back (the global state steps are guarded by)
    assert torch.equal(tokens, eager[..., :PROMPT.numel() + 6])
    assert set(timings["stages"]) == {"eager"} and background.loader.ident is None
    assert "not needed" in background.summary(timings["stages"])


def rewrite_header(path: Path, environment=None, **changes):
    with open(path, "rb") as file:
        magic, header, step = file.readline(), json.loads(file.readline()), file.read()
    header["identity"].update(changes)
    header["environment"] = environment or header["environment"]
    path.write_bytes(magic + json.dumps(header).encode() + b"\n" + step)


LOAD_WITHOUT_COMPILER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import compiled_step, generate
from torch._inductor import cpp_builder

def refuse(builder, *args, **kwargs):
    raise AssertionError(f"the C++ compiler ran for {builder.get_target_file_path()}")

cpp_builder.CppBuilder.build = refuse
model = generate.load_model(sys.argv[2], "cpu", torch.float32)
model.setup_caches(max_batch_size=1, max_seq_length=int(sys.argv[3]))
background = compiled_step.BackgroundCompile(model, sys.argv[2], 1, {}, "auto", command=None).start()
assert background.current[0] == "whole" and background.notes == [], (background.current[0], background.notes)
timings = {}
tokens = generate.generate(model, torch.tensor(eval(sys.argv[4])), 40, max_seq_length=int(sys.argv[3]),
                           timings=timings, background=background)
assert set(timings["stages"]) == {"whole"}
print(tokens.tolist())
"""


@pytest.mark.slow
def test_saved_step_loads_with_an_empty_inductor_cache_without_compiling(built, tmp_path):
    """Another checkout or virtual environment, or /tmp emptied by a reboot: inductor's cache has none of the
    step's C++. The file carries its binaries, so a new process with an empty cache loads it, the C++ compiler
    never runs (it raises there), and the tokens are eager's."""
    checkpoint, eager, _, _, _ = built
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-inductor-cache")}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_COMPILER, str(ROOT), str(checkpoint),
                             str(CACHE_LENGTH), str(PROMPT.tolist())], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == eager.tolist()


@pytest.mark.slow
def test_step_whose_cpp_would_not_be_found_is_left_to_the_build_process(built, tmp_path):
    """Saved where Python's headers or the compiler differ, its C++ would be compiled again on load: a decoding
    process does not load it (quietly: the build process will), the build process does."""
    checkpoint, eager, _, _, _ = built
    copy = tmp_path / "model.pth"
    shutil.copy(checkpoint, copy)
    shutil.copytree(checkpoint.parent / "compiled", tmp_path / "compiled")
    for path in (tmp_path / "compiled").glob("*.pt2"):
        rewrite_header(path, environment='["/elsewhere/include/python3.11", "/elsewhere/lib", [null, "clang++"]]')
    model = tiny_model(copy)
    background = compiled_step.BackgroundCompile(model, copy, 1, {}, "auto", command=None).start()
    assert background.current[0] == "eager" and background.notes == []
    path = compiled_step.artifact_path(copy, "whole", compiled_step.step_digest(model, "whole", {}))
    step, note = compiled_step.load_step(path, same_environment_only=False)
    assert note is None and step is not None


def test_compiled_cpp_is_named_alike_under_every_install_of_this_torch(monkeypatch, tmp_path):
    """Inductor names a compiled file after its source and the compiler's command line, which holds torch's
    install path; under portable_cpp_cache two installs (checkouts, virtual environments) give one name, and
    other flags still another. Every C++ source is recorded for save_step."""
    from torch._inductor import codecache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled_step.portable_cpp_cache()
    source, names = "int answer() { return 42; }", []
    for root in ("/venv-a/lib/python3.11/site-packages/torch", "/home/b/clone/.venv/lib/python3.11/site-packages/torch"):
        monkeypatch.setattr(compiled_step, "TORCH_ROOTS", [root])
        names.append(codecache.write(source, "main.cpp", extra=f"g++ -O3 -I{root}/include -L{root}/lib")[0])
        assert compiled_step.compiled_sources[-1] == ("main.cpp", str(tmp_path / names[-1][1:3] / f"{names[-1]}.main.cpp"))
    assert names[0] == names[1]
    assert codecache.write(source, "main.cpp", extra=f"g++ -O1 -I{root}/include -L{root}/lib")[0] != names[0]
    assert codecache.write(source, "txt", extra=f"-I{root}/include")[0] != codecache.write(source, "txt", extra="-I/x")[0]


@pytest.mark.slow
@pytest.mark.parametrize("changes, said", [({"torch": "2.0.0"}, "torch '2.0.0'"),
                                           ({"flags": "sse2"}, "other CPU flags")])
def test_step_from_another_torch_or_cpu_is_refused_with_a_note(built, tmp_path, changes, said):
    checkpoint, eager, _, _, _ = built
    copy = tmp_path / "model.pth"
    shutil.copy(checkpoint, copy)
    shutil.copytree(checkpoint.parent / "compiled", tmp_path / "compiled")
    for path in (tmp_path / "compiled").glob("*.pt2"):
        rewrite_header(path, **changes)
    model = tiny_model(copy)
    background = compiled_step.BackgroundCompile(model, copy, 1, {}, "auto", command=None).start()
    assert background.current[0] == "eager"
    assert len(background.notes) == 2 and all(said in note and "building it again" in note for note in background.notes)
    assert torch.equal(generate.generate(model, PROMPT, 40, max_seq_length=CACHE_LENGTH, background=background), eager)


@pytest.mark.slow
def test_corrupt_step_is_rebuilt(built, tmp_path):
    checkpoint, eager, _, _, _ = built
    copy = tmp_path / "model.pth"
    shutil.copy(checkpoint, copy)
    (tmp_path / "compiled").mkdir()
    model = tiny_model(copy)
    path = compiled_step.artifact_path(copy, "regional", compiled_step.step_digest(model, "regional", {}))
    path.write_bytes(compiled_step.MAGIC + b"{not json\n")
    notes = []
    compiled_step.build_stages(model, copy, 1, {}, "regional", log=notes.append)
    assert "is unreadable" in notes[0] and "building it again" in notes[0]
    step, note = compiled_step.load_step(path, same_environment_only=True)
    assert note is None and step is not None
    background = compiled_step.BackgroundCompile(tiny_model(copy), copy, 1, {}, "regional", command=None).start()
    assert background.current[0] == "regional"


def test_cache_length_is_rounded_within_the_context():
    assert compiled_step.cache_length(37 + 200, 8192) == 256
    assert compiled_step.cache_length(257, 8192) == 512
    assert compiled_step.cache_length(300, 320) == 320  # not past the model's context
    assert compiled_step.cache_length(400, 320) == 400  # a request past the context is checked elsewhere


def test_step_name_follows_what_it_computes(tiny_models):
    """The file name's hash changes with the KV cache length, the dtype, the stage and the sampling."""
    _, _, checkpoint = tiny_models["llama"]
    model = tiny_model(checkpoint)
    digest = compiled_step.step_digest(model, "whole", {})
    assert digest == compiled_step.step_digest(tiny_model(checkpoint), "whole", {})
    assert digest != compiled_step.step_digest(model, "regional", {})
    assert digest != compiled_step.step_digest(model, "whole", {"temperature": 0.8})
    model.setup_caches(max_batch_size=1, max_seq_length=2 * CACHE_LENGTH)
    assert digest != compiled_step.step_digest(model, "whole", {})
    assert digest != compiled_step.step_digest(tiny_model(checkpoint).bfloat16(), "whole", {})


def test_a_saved_step_keeps_only_the_global_state_guard():
    """A real step's ~400 tensor guards cost about 1 ms a token; the file's name pins the tensors instead."""
    seen = []

    def recording(entries):
        kept = compiled_step.global_state_guards_only(entries)
        seen.extend(zip((entry.guard_type for entry in entries), kept))
        return kept

    def step(module, x):
        return module(x).relu()

    compiled = torch.compile(step, fullgraph=True, options={"guard_filter_fn": recording})
    compiled.aot_compile(((torch.nn.Linear(4, 4), torch.ones(1, 4)), {}))
    assert {kind for kind, kept in seen if kept} == {"GLOBAL_STATE"}
    assert "TENSOR_MATCH" in {kind for kind, kept in seen if not kept}


@pytest.mark.slow
def test_a_loaded_step_has_its_global_state_checked_before_each_token(built):
    """A loaded step's guard (grad mode and the like) is checked by next_step, not by binding every call's
    arguments: under grad mode, which the step was not compiled for, the decode falls back to eager."""
    checkpoint = built[0]
    model = tiny_model(checkpoint)
    background = compiled_step.BackgroundCompile(model, checkpoint, 1, {}, "auto", command=None).start()
    stage, step = background.current
    assert stage == "whole" and hasattr(step, "global_state_holds")
    with torch.no_grad():
        assert step.global_state_holds() and background.next_step()[0] == "whole"
    with torch.enable_grad():
        assert not step.global_state_holds() and background.next_step()[0] == "eager"
