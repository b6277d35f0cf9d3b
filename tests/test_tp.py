"""tp.py: tensor parallel and pipeline stages through torchrun on CPU (gloo), against one process.

The oracle is the single-process float32 run of the same checkpoint: greedy tokens identical, logits within
1e-4 (the all-reduce adds the ranks' partial sums in another order). Quantized runs compare tokens only; the
tiny models' quantized runs let the CPU kernels take float32 activations (tp_worker.float32_kernels), SmolLM2's
int8 runs use the kernels as users do (bfloat16 activations).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpu_ops
import generate
import memory
import pipeline
import quantize
import tp
import tp_worker

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# The ranks and the single process compared with them must take the same kernel paths: each process times
# its candidates on its own (under load, concurrently), and the native int8 path rounds activations where ATen's
# does not, so a different choice can change a greedy token. These tests pin ATen's paths; tests/test_cpu_ops.py
# checks the native ones.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GPT_FAST_NO_NATIVE": "1"}


def torchrun(nproc: int, *args, timeout=300, env=None):
    return subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or ENV)


# ---------------------------------------------------------------- sharding, in one process


def row_and_column_shards(module, world, row_unit=1, column_unit=1):
    """Each rank's copy of `module` split by output rows, and by input columns (as tp.py splits wqkv/w1/w3
    and wo/w2), in whole units."""
    import copy

    rows, columns = [], []
    for rank in range(world):
        start, end = (row_unit * i for i in tp.split(module.out_features // row_unit, world, rank))
        rows.append(copy.deepcopy(module))
        tp.keep_rows(rows[-1], "test", [(start, end)])
        start, end = (column_unit * i for i in tp.split(module.in_features // column_unit, world, rank))
        columns.append((copy.deepcopy(module), (start, end)))
        tp.keep_columns(columns[-1][0], "test", start, end, keep_bias=rank == 0)
    return rows, columns


class OnePath:
    """Stands in for cpu_ops.KernelChoices: every layer takes `path` where it can (no timing), so the full layer
    and its shards compute alike; a measured choice could differ between shapes (the native path rounds the
    activations to int8, ATen's does not), which is a kernel difference, not a sharding one."""

    def __init__(self, path):
        self.path = path

    def choose(self, key, timers):
        return self.path if self.path in timers else next(iter(timers))


@pytest.mark.parametrize("kind,path", [("float", None), ("int8", "aten"), ("int8", "native"),
                                       ("int4", "aten"), ("int4", "native"), ("int4 per channel", "dequant"),
                                       ("int4 per channel", "native")])
def test_row_and_column_shards_recompose_the_layer(kind, path):
    """Rows concatenated and column partial sums added give the unsplit layer's output, for each format and CPU
    path; int4 columns split on group boundaries (three groups over two ranks: 32 + 64 columns); int4 per
    channel (one group of 96) in blocks of 32, every rank keeping each row's scale and zero."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)
    module = {"float": linear, "int8": quantize.Int8Linear.from_linear(linear),
              "int4": quantize.Int4Linear.from_linear(linear, 32),
              "int4 per channel": quantize.Int4Linear.from_linear(linear, None)}[kind]
    int4 = kind.startswith("int4")
    rows, columns = row_and_column_shards(module, 2, *((16, 32) if int4 else (1, 1)))
    if kind != "float":
        if path == "native" and not cpu_ops.load():
            pytest.skip("the native CPU kernels did not build here")
        for shard in [module, *rows, *(shard for shard, _ in columns)]:
            shard.prepare_for_device(torch.bfloat16, OnePath(path))
        # (int8 column shards of 48 inputs are not whole blocks of 32: they keep ATen's path)
        assert all(shard.paths[3] == path for shard in [module, *rows])
    x = torch.randn(3, 96).to(torch.float32 if kind == "float" else torch.bfloat16)
    full = module(x).float()
    assert [shard.out_features for shard in rows] == ([16, 32] if int4 else [24, 24])
    assert torch.allclose(torch.cat([shard(x).float() for shard in rows], dim=-1), full, atol=1e-6)
    assert [span for _, span in columns] == ([(0, 32), (32, 96)] if int4 else [(0, 48), (48, 96)])
    partial = sum(shard(x[:, a:b].contiguous()).float() for shard, (a, b) in columns)
    assert torch.allclose(partial, full, atol=0.05 if kind != "float" else 1e-5)  # bf16 kernels round each part
    assert columns[0][0].bias is not None and columns[1][0].bias is None  # the bias is added once


def test_int4_columns_off_group_boundaries_are_refused():
    module = quantize.Int4Linear.from_linear(torch.nn.Linear(96, 16), 32)
    with pytest.raises(tp.DistributedError, match="do not fall on int4 group boundaries"):
        tp.keep_columns(module, "layers.0.feed_forward.w2", 0, 48, keep_bias=True)


def test_stage_lists():
    assert pipeline.parse_stages("10,10,12") == [10, 10, 12]
    with pytest.raises(ValueError, match="layer counts separated by commas"):
        pipeline.parse_stages("10;22")
    with pytest.raises(ValueError, match="at least one layer"):
        pipeline.parse_stages("0,32")
    assert [tp.split(9, 2, r) for r in range(2)] == [(0, 4), (4, 9)]


# ---------------------------------------------------------------- torchrun --nproc_per_node=2 against one process


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def cases(tiny_models, smollm2_checkpoint, tmp_path_factory) -> list:
    from tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tp_quantized")
    result = []
    generator = torch.Generator().manual_seed(0)
    for family in FAMILIES:
        checkpoint = tiny_models[family][2]
        int8 = quantize.quantize_checkpoint(checkpoint, "int8", 32)
        prompt = torch.randint(0, 256, (12,), generator=generator).tolist()
        for mode, stages in (("tp", None), ("pp", [1, 1])):
            for precision, path in (("float32", checkpoint), ("int8", int8)):
                if family == "mistral" and precision == "int8":
                    continue
                result.append(dict(name=f"{family}-{mode}-{precision}", checkpoint=str(path), stages=stages,
                                   prompt=prompt, new_tokens=24, float32_kernels=precision != "float32"))
    int4 = quantize.quantize_checkpoint(tiny_models["llama"][2], "int4", 32)
    result.append(dict(name="llama-tp-int4", checkpoint=str(int4), stages=None, prompt=result[0]["prompt"],
                       new_tokens=24, float32_kernels=True))
    # The draft is the Qwen3 tiny model (same vocabulary, other weights): many proposals are rejected.
    result.append(dict(name="llama-tp-draft-qwen3", checkpoint=str(tiny_models["llama"][2]), stages=None,
                       prompt=result[0]["prompt"], new_tokens=24, draft=str(tiny_models["qwen3"][2])))
    prompt = Tokenizer(smollm2_checkpoint.parent).encode("The three most famous monuments of Paris are")
    smollm2_int8 = quantize.quantize_checkpoint(smollm2_checkpoint, "int8", 32)
    for mode, stages in (("tp", None), ("pp", [14, 16])):
        for precision, path in (("float32", smollm2_checkpoint), ("int8", smollm2_int8)):
            result.append(dict(name=f"smollm2-{mode}-{precision}", checkpoint=str(path), stages=stages,
                               prompt=prompt, new_tokens=16))
    del folder
    return result


@pytest.fixture(scope="module")
def parallel_runs(tiny_models, smollm2_checkpoint, tmp_path_factory):
    """(cases, results of one torchrun launch over all of them, single-process references)."""
    all_cases = cases(tiny_models, smollm2_checkpoint, tmp_path_factory)
    folder = tmp_path_factory.mktemp("tp_runs")
    (folder / "cases.json").write_text(json.dumps(all_cases))
    run = torchrun(2, ROOT / "tests" / "tp_worker.py", folder / "cases.json", folder / "results.pt")
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(folder / "results.pt")
    references = {}
    native, cpu_ops._loaded = cpu_ops._loaded, False  # the references take ATen's paths too (see ENV)
    for case in all_cases:
        tp_worker.float32_kernels(case.get("float32_kernels", False))
        model = generate.load_model(case["checkpoint"], "cpu", torch.float32)
        references[case["name"]] = dict(zip(("tokens", "logits"), tp_worker.run_case(model, case["prompt"],
                                                                                     case["new_tokens"])))
    tp_worker.float32_kernels(False)
    cpu_ops._loaded = native
    return {case["name"]: case for case in all_cases}, results, references


CASE_NAMES = ([f"{family}-{mode}-{precision}" for family in FAMILIES for mode in ("tp", "pp")
               for precision in ("float32", "int8") if not (family == "mistral" and precision == "int8")]
              + ["llama-tp-int4", "llama-tp-draft-qwen3"]
              + [f"smollm2-{mode}-{precision}" for mode in ("tp", "pp") for precision in ("float32", "int8")])


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_two_processes_match_one(parallel_runs, name):
    cases_by_name, results, references = parallel_runs
    result, reference = results[name], references[name]
    assert result["tokens"] == reference["tokens"]
    if "float32" in name:  # the logits of a whole-sequence prefill (split into sub-sequences by the pipeline)
        assert (result["logits"] - reference["logits"]).abs().max() < 1e-4


# ---------------------------------------------------------------- the CLI under torchrun


def generate_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=ENV)


def memory_rows(stderr: str) -> list:
    """The per-rank rows of the memory table: [(rank, layer weights MB)]."""
    rows = [line.split("|") for line in stderr.splitlines() if line.startswith("| ") and "MB" in line]
    return [(cells[1].strip(), float(cells[3].split()[0])) for cells in rows]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--pipeline_stages", "15,15"]], ids=["tensor", "pipeline"])
def test_cli_output_and_memory_report(smollm2_checkpoint, flags):
    """torchrun generate.py --compile prints exactly the single-process text, once (the compiled decode holds
    the all-reduces, or the pipeline's transfers); each rank holds about half of the layer weights (the uneven
    head split, 1 + 2 of SmolLM2's 3 KV heads, gives 46% / 54%)."""
    common = ["--checkpoint_path", smollm2_checkpoint, "--dtype", "float32", "--max_new_tokens", "20",
              "--prompt", "The capital of France is", "--report_memory"]
    single = generate_cli(*common)
    parallel = torchrun(2, "generate.py", *common, "--compile", *flags, timeout=600)
    assert single.returncode == 0, single.stderr
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout
    assert parallel.stderr.count("Generated 20 tokens") == 1  # only rank 0 prints
    assert "Communication per decode step: " in parallel.stderr
    rows = memory_rows(parallel.stderr)
    assert [rank for rank, _ in rows] == ["0", "1", "all"]
    total = rows[2][1]
    model = generate.load_model(smollm2_checkpoint, "cpu", torch.float32)
    assert abs(total - memory.layer_weight_bytes(model) / 1e6) < 0.01 * total  # the shares add up to the whole
    for _, layer_mb in rows[:2]:
        assert 0.4 * total < layer_mb < 0.6 * total


# ---------------------------------------------------------------- errors


def assert_one_error(result, message):
    assert result.returncode != 0
    assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
    assert message in result.stderr


@pytest.mark.slow
def test_more_processes_than_kv_heads(tiny_models):
    result = torchrun(3, "generate.py", "--checkpoint_path", tiny_models["llama"][2], timeout=120)
    assert_one_error(result, "error: tensor parallel over 3 processes needs at least 3 KV heads")


@pytest.mark.slow
def test_stages_that_do_not_sum_to_the_layers(tiny_models):
    result = torchrun(2, "generate.py", "--checkpoint_path", tiny_models["llama"][2], "--pipeline_stages", "1,2",
                      timeout=120)
    assert_one_error(result, "error: --pipeline_stages 1,2 sums to 3 layers but the model has 2")


def test_stages_without_torchrun(tiny_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint_path", str(tiny_models["llama"][2]), "--pipeline_stages", "1,1"])
    assert exit_info.value.code == 2
    assert "needs one process per stage: launch with torchrun --standalone --nproc_per_node=2" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "no rendezvous with all 2 processes"),
], ids=["no-rank", "nobody-listening"])
def test_missing_rendezvous(tiny_models, variables, message):
    """No hang: a missing variable fails at once, an absent peer within the start-up timeout (2 s here)."""
    env = {**ENV, **variables, "GPT_FAST_STARTUP_TIMEOUT": "2"}
    if "MASTER_ADDR" in variables:
        env["MASTER_PORT"] = str(free_port())
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tiny_models["llama"][2])],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_bench_nproc_runs_only_our_rows(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--nproc", "2", "--rows", "ours-bf16,llamacpp-f16"])
    assert exit_info.value.code == 2
    assert "row 'llamacpp-f16' cannot run under --nproc" in capsys.readouterr().err
