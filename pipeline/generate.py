"""Text generation from a stage folder with a chosen decoding strategy (greedy, beam search, sampling)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from pipeline.metrics import model_device


@dataclass
class GenerationConfig:
    strategy: Literal["greedy", "beam", "sample"] = "greedy"  # decoding of the samples: `greedy`, `beam`, `sample`
    max_new_tokens: int = 40  # tokens generated per prompt
    num_beams: int = 4  # beam search only: beams kept
    temperature: float = 0.8  # sampling only: below 1 sharpens the distribution, above 1 flattens it
    top_k: int = 50  # sampling only: draw from the k most likely tokens (0 = off)
    top_p: float = 0.95  # sampling only: draw from the most likely tokens holding this probability mass (1.0 = off)
    seed: int = 0  # sampling only: same seed, same sample

    def check(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.num_beams < 1:
            problems.append(f"num_beams: {self.num_beams} must be at least 1")
        if self.temperature <= 0:
            problems.append(f"temperature: {self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} must be in (0, 1]")
        return problems

    def kwargs(self) -> dict:
        """Arguments for `model.generate` (transformers' own names)."""
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def chat_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """A user message (or a whole conversation) rendered with the tokenizer's chat template, ending where
    the assistant's answer starts."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; set data.chat_template in the recipe (or drop --chat)")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompt: str | list[dict], cfg: GenerationConfig, chat: bool = False) -> str:
    """The continuation of `prompt` (prompt text not included); with `chat`, the assistant's answer to it
    (a user message, or a list of {role, content} messages) under the tokenizer's chat template."""
    if chat or not isinstance(prompt, str):
        # the template writes its own special tokens (BOS, turn markers); the tokenizer must not add more
        enc = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:  # an empty prompt: start from BOS, as `generate` without inputs does
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt is empty and this tokenizer has no BOS token to start from; give a prompt")
        enc = {"input_ids": torch.tensor([[tokenizer.bos_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    if cfg.strategy == "sample":
        torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, **cfg.kwargs())
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def describe(cfg: GenerationConfig) -> str:
    keys = {"greedy": [], "beam": ["num_beams"], "sample": ["temperature", "top_k", "top_p", "seed"]}[cfg.strategy]
    d = asdict(cfg)
    return f"{cfg.strategy}, {cfg.max_new_tokens} new tokens" + "".join(f", {k}={d[k]}" for k in keys)
