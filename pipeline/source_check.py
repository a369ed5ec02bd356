"""The load stage's check that the source model comes in as it was trained. A tokenizer that splits words its
own vocabulary holds whole (a GGUF vocabulary converted wrongly: transformers' converter for SentencePiece-style
GGUF files did this to Gemma), or one that leaves out a BOS token the model was trained with, gives a model
whose every number is wrong while the run seems to succeed: perplexity 20x too high, "improved" by
fine-tuning on the broken tokens. Both are read off the tokenizer and its own vocabulary, without the model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.models import Source

MIN_WHOLE = 0.8  # share of vocabulary words a sound tokenizer keeps whole in running text (measured: 0.97-1.0)
MIN_WORDS = 30  # fewer checkable words than this: too little evidence for a verdict
TEXT_CHARS = 20_000  # of the check text: enough words, a fraction of a second to tokenize
SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE's and SentencePiece's mark of a leading space


def intended_bos(source: Source) -> bool | None:
    """Whether the source says its tokenizer adds BOS (`tokenizer.ggml.add_bos_token` of a GGUF file,
    `add_bos_token` of a folder's tokenizer_config.json); None when it does not say."""
    if source.gguf_file:
        from gguf import GGUFReader

        field = GGUFReader(Path(source.path) / source.gguf_file).fields.get("tokenizer.ggml.add_bos_token")
        return bool(field.contents()) if field is not None else None
    path = Path(source.path) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text()).get("add_bos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def restore_bos(tokenizer) -> bool:
    """Make the tokenizer add its BOS token, as the model was trained (transformers 5's generic tokenizer
    ignores `add_bos_token` from a GGUF file or a tokenizer_config.json); whether it now does."""
    if tokenizer.bos_token_id is None:
        return False
    try:
        tokenizer.add_bos_token = True  # rebuilds the post-processor; kept by save_pretrained
    except (AttributeError, ValueError, TypeError):
        return False
    return adds_bos(tokenizer)


def whole_words(tokenizer, text: str) -> dict:
    """How the tokenizer cuts running text: of the words (after a space) that its vocabulary holds as one token,
    the share it keeps as that one token; and tokens per whitespace-separated word."""
    text = text[:TEXT_CHARS]
    vocab = {t[1:] for t in tokenizer.get_vocab() if t[:1] in SPACE_MARKERS and len(t) > 2 and t[1:].isalpha()}
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = {tuple(span) for span in enc["offset_mapping"]}
    checked = whole = 0
    for m in re.finditer(r"(?<= )([^\W\d_]{2,})\b", text):
        if m.group(1) in vocab:
            checked += 1
            start, end = m.span(1)
            whole += (start - 1, end) in spans or (start, end) in spans  # the token may or may not span the space
    words = len(text.split())
    return {"vocabulary_words": checked, "kept_whole": round(whole / checked, 3) if checked else None,
            "tokens_per_word": round(len(enc["input_ids"]) / words, 2) if words else None}


def check(source: Source, tokenizer, text: str) -> tuple[dict, list[str]]:
    """(findings for the stage record, problems); restores a BOS the source asks for where it can."""
    findings: dict = {}
    problems = []
    wanted = intended_bos(source)
    if wanted and not adds_bos(tokenizer):
        findings["bos_restored"] = restore_bos(tokenizer)
        if not findings["bos_restored"]:
            problems.append(f"its files say the tokenizer adds the BOS token ({tokenizer.bos_token!r}), but the "
                            "loaded tokenizer does not, and it could not be made to: the model would never see "
                            "the first token it was trained with")
    findings["adds_bos"] = adds_bos(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        findings.update(whole_words(tokenizer, text))
        share = findings["kept_whole"]
        if share is not None and findings["vocabulary_words"] >= MIN_WORDS and share < MIN_WHOLE:
            problems.append(f"the tokenizer splits words its own vocabulary holds whole: of {findings['vocabulary_words']} "
                            f"words of the check text that are single tokens in its vocabulary it keeps "
                            f"{share:.0%} whole (a sound tokenizer: nearly all), {findings['tokens_per_word']} "
                            "tokens per word. Its vocabulary was likely converted wrongly (transformers' reader of "
                            "SentencePiece-style GGUF files does this): load the original model folder instead of "
                            "the GGUF file")
    return findings, problems
