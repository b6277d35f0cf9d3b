"""Run by tests/test_tp.py under torchrun: many (model, layout) cases in one launch, so that process start-up
and the rendezvous are paid once. Also imported by the test for the single-process reference (`run_case`).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tp_worker.py CASES.json RESULTS.pt

Each case: {"name", "checkpoint", "stages": null (tensor parallel) or [layers per stage], "prompt": [ids],
"new_tokens", "draft": null or a checkpoint to draft with, "float32_kernels": bool}. Rank 0 saves
{name: {"tokens", "logits"}}.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
import quantize  # noqa: E402
import tp  # noqa: E402


@torch.no_grad()
def run_case(model, prompt: list, new_tokens: int):
    """Greedy tokens, then the logits of one forward over the whole sequence (a prefill of it)."""
    prompt = torch.tensor(prompt)
    tokens = generate.generate(model, prompt, new_tokens, stop_ids=())[0]
    logits = model(tokens[None, :-1], torch.arange(len(tokens) - 1))[0]
    return tokens[len(prompt):].tolist(), logits.float()


@torch.no_grad()
def speculative_greedy(target, draft, prompt: list, new_tokens: int, k: int = 3) -> list:
    """Greedy speculative decoding, the plainest form: the draft proposes k tokens one by one, the target checks
    them in one forward over k + 1 positions, the agreeing prefix and the target's next token are kept. Both
    KV caches hold positions 0 .. len(seq) - 2 at the start of each round; rejected entries are rewritten
    before any query can attend to them. Its tokens equal the target's plain greedy tokens."""
    seq, length = list(prompt), len(prompt) + new_tokens + k + 1
    for model in (target, draft):
        model.setup_caches(1, length)
    x = torch.tensor([seq])
    seq.append(int(target(x, torch.arange(len(prompt)))[0, -1].argmax()))
    draft(x, torch.arange(len(prompt)))
    while len(seq) - len(prompt) < new_tokens:
        n, proposal = len(seq), []
        for i in range(k):
            last = proposal[-1] if proposal else seq[-1]
            proposal.append(int(draft(torch.tensor([[last]]), torch.tensor([n - 1 + i]))[0, -1].argmax()))
        checked = target(torch.tensor([[seq[-1]] + proposal]), torch.arange(n - 1, n + k))[0].argmax(-1).tolist()
        accepted = 0
        while accepted < k and proposal[accepted] == checked[accepted]:
            accepted += 1
        if accepted == k:  # the draft never saw its own last proposal
            draft(torch.tensor([[proposal[-1]]]), torch.tensor([n + k - 1]))
        seq += proposal[:accepted] + [checked[accepted]]
    return seq[len(prompt):len(prompt) + new_tokens]


def float32_kernels(on: bool):
    """With float32 activations the CPU int8/int4 kernels normally take them rounded to bfloat16, which turns
    the last-bit differences of a parallel sum into bfloat16-sized ones: on a tiny random model, whose greedy
    choices are near ties, that flips tokens. Letting the kernels take float32 (slower) makes a quantized run
    as exact as a float one, which is what checks that quantized tensors are sliced right."""
    quantize.CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16) + ((torch.float32,) if on else ())


def main(cases_path: str, results_path: str):
    cases = json.loads(Path(cases_path).read_text())
    world_size = int(__import__("os").environ["WORLD_SIZE"])
    layout = tp.init("cpu", [1] * world_size)  # pipeline groups made once; tensor-parallel cases reuse the layout
    results = {}
    for case in cases:
        float32_kernels(case.get("float32_kernels", False))
        case_layout = dataclasses.replace(layout, pipeline_stages=case["stages"])
        model = generate.load_model(case["checkpoint"], "cpu", torch.float32, shard=generate.shard_for(case_layout))
        if case.get("draft"):
            draft = generate.load_model(case["draft"], "cpu", torch.float32, shard=generate.shard_for(case_layout))
            results[case["name"]] = {"tokens": speculative_greedy(model, draft, case["prompt"], case["new_tokens"])}
        else:
            tokens, logits = run_case(model, case["prompt"], case["new_tokens"])
            results[case["name"]] = {"tokens": tokens, "logits": logits}
    if layout.rank == 0:
        torch.save(results, results_path)
    tp.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
