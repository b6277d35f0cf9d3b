"""Perplexity of a text file, in sliding windows, for any checkpoint (float or quantized).

    python eval.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model_int4.g32.pth --text_file /usr/share/common-licenses/GPL-3

Each window holds up to --max_seq_length tokens and moves by --stride; a token is scored once, in the first
window that reaches it, with the window's earlier tokens as context (the method of HF's perplexity guide).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from convert_hf_checkpoint import ConversionError
from generate import DTYPES, load_model
from tokenizer import Tokenizer


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, max_seq_length: int = 1024, stride: int = 512) -> tuple:
    """(perplexity, tokens scored) of a 1-D token tensor."""
    model.setup_caches(1, max_seq_length)
    total_nll, scored, end_of_previous = 0.0, 0, 0
    starts = range(0, max(len(tokens) - 1, 1), stride)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=len(starts) < 2):
        window = tokens[start:start + max_seq_length]
        if len(window) < 2:
            break
        logits = model(window[None], torch.arange(len(window), device=tokens.device))[0, :-1].float()
        targets = window[1:]
        # Only targets past what earlier windows scored count; the rest of the window is context.
        first_new = max(end_of_previous - start - 1, 0)
        nll = F.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum")
        total_nll, scored = total_nll + nll.item(), scored + len(targets) - first_new
        end_of_previous = start + len(window)
        if end_of_previous >= len(tokens):
            break
    return math.exp(total_nll / scored), scored


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path, required=True)
    parser.add_argument("--text_file", type=Path, required=True)
    parser.add_argument("--max_seq_length", type=int, default=1024, help="window length in tokens")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    parser.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    stride = args.stride or args.max_seq_length // 2
    if args.max_seq_length < 2 or not 0 < stride <= args.max_seq_length:
        parser.error("need --max_seq_length >= 2 and 0 < --stride <= --max_seq_length")
    try:
        for path, what in ((args.checkpoint_path, "checkpoint"), (args.text_file, "text file")):
            if not path.is_file():
                raise ConversionError(f"{what} {path} not found")
        start = time.perf_counter()
        model = load_model(args.checkpoint_path, args.device, DTYPES[args.dtype])
        tokenizer = Tokenizer(args.checkpoint_path.parent)
        ids = tokenizer.encode(args.text_file.read_text(errors="replace"))[: args.max_tokens]
        if len(ids) < 2:
            raise ConversionError(f"{args.text_file} has fewer than 2 tokens; nothing to evaluate")
        value, scored = perplexity(model, torch.tensor(ids, device=args.device), args.max_seq_length, stride)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    elapsed = time.perf_counter() - start
    print(f"{args.checkpoint_path.name}: {scored} tokens evaluated, perplexity {value:.4f} "
          f"({elapsed:.1f} s, {scored / elapsed:.0f} tokens/s, window {args.max_seq_length}, stride {stride})")


if __name__ == "__main__":
    main()
