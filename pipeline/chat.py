"""Chat / instruction data: conversations rendered with a chat template, loss on the assistant's tokens.

Rows hold either `messages` (a list of {role, content}) or a `prompt` and a `response`. The assistant's
part of the rendered text is found by rendering the conversation up to each assistant turn with the
generation prompt (everything the model is given) and up to the end of that turn; the characters in
between are the response, and the tokens that cover them are the only ones with labels.
"""
from __future__ import annotations

import logging

from pipeline.columns import cap_train, columns_of, missing_columns, require_text_column
from pipeline.errors import StageError

log = logging.getLogger("pipeline")
IGNORE = -100  # label value the loss skips (transformers' convention)


def check_columns(dsd, cfg):
    """`dsd` with every row usable for chat training: a bad row is an error naming it, or with `data.bad_rows:
    drop` left out (counted by cause in one warning)."""
    out = {}
    for name, split in dsd.items():
        if cfg.messages_column in split.column_names:
            feature = split.features[cfg.messages_column]
            turn = getattr(feature, "feature", feature[0] if isinstance(feature, list) and feature else None)
            if not isinstance(turn, dict) or not {"role", "content"} <= set(turn):
                raise StageError(
                    f"data.messages_column: column '{cfg.messages_column}' of '{cfg.source}' holds {feature}, not "
                    "a list of {role, content} turns; fix the data, or set data.messages_column to the column that "
                    "holds the conversations"
                )
            bad = {row: why for row, turns in enumerate(split[cfg.messages_column]) if (why := _bad_turns(turns))}
        else:
            if problem := missing_columns(cfg, columns_of(split), cfg.source):
                raise StageError(problem)
            require_text_column(split, cfg.prompt_column, "prompt_column", cfg)
            require_text_column(split, cfg.response_column, "response_column", cfg)
            # nothing to learn from, and a label-free example the trainer would take without a word
            bad = {row: ("an empty response", f"its data.response_column '{cfg.response_column}' is empty",
                         "give every row a response")
                   for row, text in enumerate(split[cfg.response_column]) if not text.strip()}
        out[name] = _without(split, bad, cfg, name)
    return type(dsd)(out)


def _without(split, bad: dict, cfg, name: str):
    """`split` less its `bad` rows ({index: (cause, what is wrong, fix)}); an error naming the first unless
    `cfg.bad_rows` is drop. Rows are numbered as in the data (one split: the check runs before the split)."""
    if not bad:
        return split
    row, (_, what, fix) = next(iter(bad.items()))
    of = (f"the {name} split of " if cfg.validation_split else "") + f"'{cfg.source}'"
    where = f"data: row {row + 1} of {of}"
    if cfg.bad_rows == "error":
        more = f" ({len(bad)} rows have such problems)" if len(bad) > 1 else ""
        raise StageError(f"{where}: {what}{more}; {fix}, remove the row, or set data.bad_rows: drop to leave such "
                         "rows out")
    if len(bad) == len(split):
        raise StageError(f"{where}: {what}, and so is every other row; {fix}")
    causes: dict[str, int] = {}
    for cause, _, _ in bad.values():
        causes[cause] = causes.get(cause, 0) + 1
    log.warning("data: left out %d of %d rows of %s (data.bad_rows: drop): %s", len(bad), len(split), of,
                ", ".join(f"{n} with {c}" for c, n in sorted(causes.items(), key=lambda kv: -kv[1])))
    return split.select([i for i in range(len(split)) if i not in bad])


ROLES = ("system", "user", "assistant", "tool")  # what chat templates render


def _bad_turns(turns) -> tuple[str, str, str] | None:
    """Why a conversation is unusable (cause, what, fix): every turn needs a known role and text, and the
    conversation an assistant turn to learn from. None when it is usable."""
    if not turns:
        return "no turns", "it has no turns", "give it a conversation"
    for n, turn in enumerate(turns, 1):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return ("an unknown role", f"turn {n}: role {role!r} is not one of {', '.join(ROLES)}, the roles chat "
                    "templates render", "name the user's turns role 'user' and the model's role 'assistant' (not "
                    "'human', 'gpt', 'bot', ...)")
        if not isinstance(content, str) or not content.strip():
            return ("empty or null content", f"turn {n} ({role}): the content is "
                    f"{'null' if content is None else 'empty'}", "give every turn text")
    if not any(t.get("role") == "assistant" for t in turns):
        return ("no assistant turn", "it has no assistant turn, so nothing to learn from (the loss is on the "
                "assistant's tokens only)", "add the answer")
    return None


def conversation(row: dict, cfg) -> list[dict]:
    messages = row.get(cfg.messages_column)
    if messages is not None:
        return messages
    return [{"role": "user", "content": row[cfg.prompt_column]},
            {"role": "assistant", "content": row[cfg.response_column]}]


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(messages: list[dict], tokenizer) -> dict:
    """input_ids of the rendered conversation, and labels that are -100 outside the assistant's turns."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or start > len(upto):
            raise StageError(
                "data.chat_template: the chat template does not render a conversation as a prefix of the "
                "longer one, so the response tokens cannot be found; set data.chat_template to a template "
                "that only appends each turn"
            )
        spans.append((start, len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token that straddles the boundary (" A" after "A:") carries response text, so it is learned too.
    labels = [tok if any(begin < b and end > a for a, b in spans) else IGNORE
              for tok, (begin, end) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"], "labels": labels}


def tokenize(dsd, tokenizer, cfg):
    """Render and tokenize every conversation (cached by `datasets`)."""
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template  # saved with the model, so inference formats alike
    if not tokenizer.chat_template:
        raise StageError(
            "data.chat_template: the tokenizer of this model has no chat template; set data.chat_template to a "
            "Jinja template, e.g. \"{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}\""
        )
    if not tokenizer.is_fast:
        raise StageError("data.format chat needs a fast (Rust) tokenizer to map the response text to tokens")

    def encode_batch(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = {"input_ids": [], "labels": []}
        for row in rows:
            try:
                enc = encode(conversation(row, cfg), tokenizer)
            except StageError:
                raise
            except Exception as err:  # jinja / malformed rows: name the row, not the template engine
                raise StageError(f"data.format chat: cannot render the conversation {row}: {err}") from err
            out["input_ids"].append(enc["input_ids"])
            out["labels"].append(enc["labels"])
        return out

    return dsd.map(encode_batch, batched=True, remove_columns=dsd["train"].column_names,
                   desc="Rendering chat template", load_from_cache_file=True)


def examples(tokenized, block_size: int, max_examples: int | None, source: str = "the data"):
    """One training example per conversation, cut to `block_size` tokens; examples whose response was cut
    off entirely are dropped (they would have no loss at all)."""
    def cut(row):  # response_at: where the first assistant token is; -1: the conversation has none
        first = next((i for i, t in enumerate(row["labels"]) if t != IGNORE), -1)
        return {"input_ids": row["input_ids"][:block_size], "labels": row["labels"][:block_size],
                "response_at": first}

    cut_rows = tokenized.map(cut, desc=f"Cutting conversations to {block_size} tokens")
    kept = cut_rows.filter(lambda row: 0 <= row["response_at"] < block_size, desc="Dropping empty responses")
    for name in kept:
        dropped = len(cut_rows[name]) - len(kept[name])
        if not dropped:
            continue
        starts = cut_rows[name]["response_at"]
        silent = starts.count(-1)
        if silent:
            if name == "train" and silent == len(starts):
                raise StageError(f"data.messages_column: no training conversation of '{source}' has a turn with "
                                 "role 'assistant', so there is nothing to learn; name the model's turns "
                                 "'assistant' (not 'gpt', 'bot', ...) and the user's 'user'")
            log.warning("data: %d of %d %s conversations have no assistant turn and are dropped", silent,
                        len(starts), name)
            if silent == dropped:
                continue
        cut_off = [s for s in starts if s >= block_size]
        fix = (f"raise data.block_size to at least {min(cut_off) + 1} ({max(cut_off) + 1} keeps them all: their "
               f"prompts are {min(cut_off)} to {max(cut_off)} tokens long), or shorten the prompts")
        if name == "train" and len(kept[name]) == 0:
            raise StageError(f"data.block_size: every one of the {len(cut_off)} training conversations of '{source}' "
                             f"has its assistant turns cut off by data.block_size {block_size}, so none has a "
                             f"token to learn; {fix}")
        log.warning("data: %d of %d %s conversations lose every assistant token to data.block_size %d and are "
                    "dropped; %s", len(cut_off), len(starts), name, block_size, fix)
    return cap_train(kept.remove_columns("response_at"), max_examples)


def collator(tokenizer):
    """Pads each batch to its longest example; padded positions get label -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding="longest")
