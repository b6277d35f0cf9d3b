"""Turning logits into tokens: temperature, top-k, top-p, greedy; and one decode step (a forward, then a sample).

Shared by the plain decode loop (generate.py), the drafting strategies (drafting.py) and GPTQ's
self-generated calibration text (quantize.py), so that all of them sample alike.
"""
from typing import Optional

import torch
from torch import Tensor


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0):
    """Next token [batch, 1] from the last position's logits, and the distribution it was drawn from."""
    logits = logits[:, -1].float()
    if temperature <= 0:  # greedy
        return logits.argmax(dim=-1, keepdim=True), torch.softmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Exponential-race sampling: same distribution as multinomial, without a device sync.
    noise = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / noise, dim=-1, keepdim=True), probs


def decode_one_token(model, x: Tensor, input_pos: Tensor, **sampling):
    """One token per row [batch, 1] after tokens x [batch, 1] at input_pos [1]: the step torch.compile'd."""
    return sample(model(x, input_pos), **sampling)
