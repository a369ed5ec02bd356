"""Perplexity with a sliding window, as in the Hugging Face perplexity guide."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, ids: list[int], context: int, stride: int, max_tokens: int | None = None) -> dict:
    """Token-level perplexity of `ids`: each window of `context` tokens scores only the tokens
    not scored by the previous window, so every token is predicted once with up to
    `context - stride` tokens of left context."""
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("evaluation text has fewer than 2 tokens; use a larger validation split")
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    nll, scored, prev_end = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for begin in range(0, len(stream), stride):
        end = min(begin + context, len(stream))
        new = end - prev_end  # tokens this window is responsible for
        window = stream[begin:end].unsqueeze(0).to(device)
        logits = model(window, attention_mask=torch.ones_like(window)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, window[0, 1:, None])[:, 0]
        k = min(new, logp.numel())
        nll -= logp[-k:].sum().item()
        scored += k
        prev_end = end
        if end == len(stream):
            break
    model.train(was_training)
    return {
        "perplexity": math.exp(nll / scored),
        "nll": nll / scored,
        "scored_tokens": scored,
        "context": context,
        "stride": stride,
    }
