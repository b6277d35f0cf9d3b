"""Train Medusa heads (Medusa-1: the base model frozen) on text the model writes itself.

    python scripts/train_medusa.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth
    # -> checkpoints/SmolLM2-135M-Instruct/medusa/{medusa_lm_head.safetensors, config.json}
    python generate.py --compile --chat --prompt "..." --medusa_checkpoint_path checkpoints/SmolLM2-135M-Instruct/medusa

Self-distillation: the model answers chat prompts (a --prompt_file, one per line, or the built-in ones),
several sampled answers per prompt; the heads then learn to guess its own tokens 2, 3, ... places ahead
from its final hidden state. Head k's loss is weighted 0.8^k. Every head starts as the model's own
next-token predictor (an identity block and a copy of the output projection). By default the projection
stays that copy (--train_projection trains it too): the heads then share the model's output projection
at generation time, one weight read for all heads instead of one per head. A tenth of the answers is
held out; per-head top-1 / top-5 accuracy on it is printed at the end.
"""
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402
from generate import encode_prompt, generate, load_model, until_stop  # noqa: E402
from medusa import MedusaHeads, save_medusa_heads  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a short poem about the sea.",
    "Give me three tips for learning a new language.", "How does a refrigerator work?",
    "Write a Python function that reverses a string.", "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet.", "What is the difference between weather and climate?",
    "How do I make a cup of tea?", "Tell me a fun fact about space.", "What is machine learning?",
    "Describe a sunset to someone who has never seen one.", "Why is the sky blue?",
    "Write a short story about a lost dog who finds its way home.", "What should I pack for a weekend hiking trip?",
    "Explain how vaccines work.", "List five healthy breakfast ideas.", "What causes earthquakes?",
    "How can I improve my sleep?", "Write a thank-you note to a teacher.", "What is the water cycle?",
    "Explain the rules of chess briefly.", "What are prime numbers? Give examples.",
]


def self_distillation_data(model, tokenizer, prompts, samples_per_prompt, answer_length, temperature, seed):
    """Chat prompt + sampled answer, cut at the first stop token: one token list per answer."""
    torch.manual_seed(seed)
    sequences = []
    for prompt in tqdm(prompts, desc="writing answers", unit="prompt"):
        ids = torch.tensor(encode_prompt(tokenizer, prompt, chat=tokenizer.chat_template is not None))
        rows = generate(model, ids, answer_length, batch_size=samples_per_prompt, temperature=temperature, top_k=50)
        for row in rows:
            answer = until_stop(row[len(ids):].tolist(), tokenizer.eos_ids)
            sequences.append(torch.tensor(ids.tolist() + answer))
    return sequences


@torch.no_grad()
def hidden_states(model, sequences, num_heads):
    """(final normed hidden states [N, dim], targets [N, num_heads]): position t's target for head k is token
    t + k + 2; positions with no such token for every head are dropped."""
    features, targets = [], []
    for tokens in tqdm(sequences, desc="hidden states", unit="seq"):
        length = len(tokens) - num_heads - 1
        if length < 1:
            continue
        model.setup_caches(1, len(tokens))
        _, hidden = model(tokens[None], torch.arange(len(tokens)), return_hidden=True)
        features.append(hidden[0, :length].float())
        targets.append(torch.stack([tokens[k + 2: k + 2 + length] for k in range(num_heads)], dim=1))
    return torch.cat(features), torch.cat(targets)


def head_losses(heads, features, targets):
    logits = heads(features)  # [N, heads, vocab]
    return torch.stack([F.cross_entropy(logits[:, k].float(), targets[:, k]) for k in range(len(heads))])


@torch.no_grad()
def accuracies(heads, features, targets, batch=1024):
    top1, top5 = torch.zeros(len(heads)), torch.zeros(len(heads))
    for start in range(0, len(features), batch):
        top = heads(features[start:start + batch]).topk(5, dim=-1).indices  # [n, heads, 5]
        hit = top == targets[start:start + batch, :, None]
        top1 += hit[..., 0].sum(0)
        top5 += hit.any(-1).sum(0)
    return top1 / len(features), top5 / len(features)


def run(argv=None):
    parser = ArgumentParser(description=__doc__)
    groups = {title: parser.add_argument_group(title) for title in ("model", "generation", "training", "output")}
    model, generation, training, output = groups.values()
    model.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"),
                       help="the model the heads draft for")
    model.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                       help="precision the model writes answers and hidden states in (the heads train in float32)")
    generation.add_argument("--prompt_file", type=Path, default=None, help="one prompt per line (default: built-in prompts)")
    generation.add_argument("--samples_per_prompt", type=int, default=4)
    generation.add_argument("--answer_length", type=int, default=128)
    generation.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the answers")
    training.add_argument("--num_heads", type=int, default=4)
    training.add_argument("--num_layers", type=int, default=1)
    training.add_argument("--epochs", type=int, default=2)
    training.add_argument("--batch_size", type=int, default=256, help="positions per optimiser step")
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--train_projection", action="store_true", help="train each head's vocab projection too")
    training.add_argument("--seed", type=int, default=0)
    output.add_argument("--output_dir", type=Path, default=None, help="default: medusa/ beside the checkpoint")
    args = parser.parse_args(argv)
    if args.prompt_file is not None and not args.prompt_file.is_file():
        raise UsageError(f"prompt file {args.prompt_file} not found")
    if not 0 < args.temperature or args.lr <= 0 or args.answer_length < 2:
        parser.error("need --temperature > 0, --lr > 0 and --answer_length >= 2")
    if min(args.num_heads, args.num_layers, args.samples_per_prompt, args.epochs, args.batch_size) < 1:
        parser.error("--num_heads, --num_layers, --samples_per_prompt, --epochs and --batch_size must be at least 1")
    output_dir = args.output_dir or args.checkpoint_path.parent / "medusa"
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    model = load_model(args.checkpoint_path, "cpu", getattr(torch, args.dtype))
    if type(model.output) is not torch.nn.Linear:  # quantize.py always quantizes the output projection
        raise UsageError("train heads on the float checkpoint (model.pth), not a quantized one")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompts = args.prompt_file.read_text().splitlines() if args.prompt_file else PROMPTS
    prompts = [p for p in prompts if p.strip()]
    sequences = self_distillation_data(model, tokenizer, prompts, args.samples_per_prompt, args.answer_length,
                                       args.temperature, args.seed)
    random.Random(args.seed).shuffle(sequences)
    held_out = max(1, len(sequences) // 10)
    train_features, train_targets = hidden_states(model, sequences[held_out:], args.num_heads)
    test_features, test_targets = hidden_states(model, sequences[:held_out], args.num_heads)
    print(f"{len(train_features)} training positions, {len(test_features)} held out", file=sys.stderr)

    heads = MedusaHeads.fresh(model.output, args.num_heads, args.num_layers).float()
    if not args.train_projection:
        for head in heads:
            head[-1].weight.requires_grad_(False)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    weights = torch.tensor([0.8 ** k for k in range(args.num_heads)])
    steps = args.epochs * ((len(train_features) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    with tqdm(total=steps, desc="training heads", unit="step") as bar:
        for _ in range(args.epochs):
            order = torch.randperm(len(train_features))
            for first in range(0, len(order), args.batch_size):
                batch = order[first:first + args.batch_size]
                losses = head_losses(heads, train_features[batch], train_targets[batch])
                loss = (weights * losses).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()

    top1, top5 = accuracies(heads, test_features, test_targets)
    base = model.args
    path = save_medusa_heads(heads, output_dir, base_model=str(args.checkpoint_path),
                             shared_projection=not args.train_projection)
    print("| head | predicts | top-1 | top-5 |\n|---:|---|---:|---:|")
    for k in range(args.num_heads):
        print(f"| {k} | token t+{k + 2} | {top1[k]:.1%} | {top5[k]:.1%} |")
    print(f"Trained {args.num_heads} heads ({base.dim} -> {base.vocab_size}) on {len(train_features)} positions "
          f"in {time.perf_counter() - start:.0f} s -> {path}", file=sys.stderr)


def main(argv=None):
    cli.run(run, argv)


if __name__ == "__main__":
    main()
