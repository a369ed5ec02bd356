"""GGUF export of SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral, Gemma saved as fast tokenizers: BPE
with byte fallback, spaces as "▁"): written as llama.cpp's "llama" vocabulary (tokens, scores, types, space prefix,
no merges), read back by transformers and by the pipeline's GGUF loader, which tokenizes as llama.cpp does."""
import json
import logging

import pytest
import torch
from gguf import TokenType
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from pipeline import models
from pipeline.formats import gguf as gguf_export
from test_gguf import TOLERANCE, WRITABLE, family_model, fields

# leading spaces, runs of spaces, digits, newlines and tabs, byte fallback (accents, a dash, emoji, CJK), empty
TEXTS = ["", "Hello world", " one leading space", "   three leading", "a   run   of spaces", "digits 1234567 and 3.14",
         "line one\nline two\n\n\ttabbed", "café naïve — ok? 🙂 中文", "x</s>y and <s> in the middle",
         "The Python interpreter reads 2024 lines:\n\tdef f(x): return x ** 2  # comment"]
IDS = torch.arange(3, 40).unsqueeze(0)


def logits(model):
    with torch.no_grad():
        return model(IDS, attention_mask=torch.ones_like(IDS)).logits


def source(tmp_path, prefix="normalizer", add_bos=True, arch="llama"):
    tok = tiny.build_spm_tokenizer(prefix, add_bos)
    folder = tmp_path / f"{arch}-{prefix}-{add_bos}"
    model = family_model(arch, tok, **WRITABLE.get(arch, {}))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok, model


def export(folder, qtype, out):
    """Through the quantize stage's path: the candidate's pending export saved into its folder."""
    return gguf_export.GGUFExport(folder, qtype, "tiny").save_pretrained(out)


def reloaded(path):
    """The pipeline's GGUF tokenizer (what the load stage, the gate and evaluate use on the file alone)."""
    return models.load_tokenizer(models.Source("gguf", str(path.parent), path.name))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """Llama 2 / TinyLlama style: adds BOS, space prefix from normalizers; written F16 and Q8_0."""
    root = tmp_path_factory.mktemp("spm")
    folder, tok, model = source(root)
    return {"folder": folder, "tokenizer": tok, "model": model,
            **{q: export(folder, q, root / q) for q in ("f16", "q8_0")}}


def test_tokenizer_kind_is_read_off_tokenizer_json(tokenizer):
    assert gguf_export.tokenizer_model(tokenizer) == "gpt2"  # tests' byte-level BPE
    for prefix in ("normalizer", "metaspace", "none"):
        assert gguf_export.tokenizer_model(tiny.build_spm_tokenizer(prefix, vocab_size=300)) == "llama"


def test_unigram_is_refused():
    from tokenizers import Tokenizer, models as tk_models
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(tk_models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    with pytest.raises(gguf_export.GGUFExportError, match="this tokenizer is Unigram"):
        gguf_export.tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=unigram))


def test_metadata_is_llama_cpps_sentencepiece_vocabulary(llama2):
    tok = llama2["tokenizer"]
    meta = fields(llama2["q8_0"])
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta  # as llama.cpp's converter: SentencePiece merges by score
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]
    assert set(types[3:259]) == {TokenType.BYTE} and set(types[259:]) == {TokenType.NORMAL}
    assert tokens[3 + 0x0A] == "<0x0A>"
    # a token scores minus the rank of the merge that makes it: llama.cpp joins the best-scored pair first
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    for rank in (0, 1, len(merges) // 2, len(merges) - 1):
        left, right = merges[rank]
        assert scores[tokens.index(left + right)] == -rank
    assert len(set(scores[259:])) > len(merges) // 2  # not all equal
    assert max(scores[:259]) < -rank  # special and byte tokens below every merge product
    for key, value in {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0, "add_bos_token": True,
                       "add_eos_token": False, "add_space_prefix": True}.items():
        assert meta[f"tokenizer.ggml.{key}"] == value, key


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_tokens_bos_and_logits(qtype, llama2):
    tok, path = llama2["tokenizer"], llama2[qtype]
    back = reloaded(path)
    for text in TEXTS:
        assert back(text).input_ids == tok(text).input_ids, text  # BOS included
        assert back.decode(tok(text).input_ids) == tok.decode(tok(text).input_ids), text
    assert tok("a").input_ids[0] == back("a").input_ids[0] == 1
    # transformers' own reader of the file (5.5 and 5.23 differ on leading spaces and BOS, see tokenize_as_llama_cpp)
    raw = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        if not text.startswith(" ") and "<s>" not in text and "</s>" not in text:
            assert raw(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    err = (logits(model) - logits(llama2["model"])).abs().max().item()
    assert 0 <= err < TOLERANCE[qtype], err


def llama_cpp_spm(meta: dict, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenization (llama-vocab.cpp, llm_tokenizer_spm) of `text` without special
    tokens, from the file's fields: spaces as "▁", one put first when add_space_prefix; the text cut into
    characters; then again and again the adjacent pair whose concatenation is a token with the highest score
    is joined (the leftmost among equal scores); a character no token spells becomes its <0xXX> byte tokens."""
    if not text:
        return []
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list((" " * meta["tokenizer.ggml.add_space_prefix"] + text).replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def test_llama_cpp_tokenizes_the_file_as_the_source_tokenizer(llama2, tmp_path, monkeypatch):
    """The scores carry the merge order: llama.cpp's algorithm on the file's fields gives the source tokenizer's ids;
    written with all scores equal (as llama.cpp's own LlamaHfVocab writes a tokenizer.json vocabulary) it gives
    other pieces."""
    tok = llama2["tokenizer"]
    plain = [t for t in TEXTS if "<s>" not in t]
    meta = fields(llama2["f16"])
    for text in plain:
        assert llama_cpp_spm(meta, text) == tok(text, add_special_tokens=False).input_ids, text
    monkeypatch.setattr(gguf_export, "scores", lambda tokenizer, tokens, spec=None: [0.0] * len(tokens))
    flat = fields(export(llama2["folder"], "f16", tmp_path))
    assert sum(llama_cpp_spm(flat, t) != tok(t, add_special_tokens=False).input_ids for t in plain) >= len(plain) // 2


def test_no_bos_and_no_space_prefix_as_the_tokenizer_behaves(tmp_path):
    """A tokenizer that adds no BOS, and a Gemma-2-like one (no space prefix) on a tiny Gemma 2."""
    folder, tok, _ = source(tmp_path, add_bos=False)
    path = export(folder, "q8_0", tmp_path / "nobos")
    assert fields(path)["tokenizer.ggml.add_bos_token"] is False
    back = reloaded(path)
    for text in TEXTS:
        assert back(text).input_ids == tok(text).input_ids, text
    folder, tok, model = source(tmp_path, prefix="none", arch="gemma2")
    path = export(folder, "q8_0", tmp_path / "gemma")
    meta = fields(path)
    assert meta["general.architecture"] == "gemma2" and meta["tokenizer.ggml.add_space_prefix"] is False
    back = reloaded(path)
    for text in TEXTS:
        assert back(text).input_ids == tok(text).input_ids, text
        if "<s>" not in text:
            assert llama_cpp_spm(meta, text) == tok(text, add_special_tokens=False).input_ids, text
    assert tok("a").input_ids[:2] == [1, tok.convert_tokens_to_ids("a")]  # no "▁a": no prefix
    err = (logits(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)) - logits(model))
    assert err.abs().max().item() < TOLERANCE["q8_0"]


def test_a_metaspace_tokenizer_gets_llama_cpps_space_prefix_with_a_warning(tmp_path, caplog):
    """Metaspace (Mistral v0.3) adds no "▁" before text that starts with a space nor after a special token;
    llama.cpp always does: written the same, said at export, and the file's tokenizer does what llama.cpp does."""
    folder, tok, _ = source(tmp_path, prefix="metaspace")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        path = export(folder, "f16", tmp_path / "out")
    assert "text that starts with a space or follows a special token" in caplog.text
    assert fields(path)["tokenizer.ggml.add_space_prefix"] is True
    back = reloaded(path)
    meta = fields(path)
    for text in TEXTS:
        same = back(text).input_ids == tok(text).input_ids
        assert same == (not text.startswith(" ") and "<s>" not in text and "</s>" not in text), text
        if "<s>" not in text:  # what llama.cpp does with the file
            assert back(text, add_special_tokens=False).input_ids == llama_cpp_spm(meta, text), text
    assert back.convert_ids_to_tokens(back(" one", add_special_tokens=False).input_ids)[0] == "\u2581"
    assert gguf_export.llama_cpp_differs(tiny.build_spm_tokenizer("normalizer", vocab_size=300)) is None


def test_quantize_stage_writes_and_gates_a_sentencepiece_gguf(llama2, make_recipe, tmp_path):
    """The gguf-q8_0 candidate of the quantize stage on the Llama-2-style model: a "llama" vocabulary, scored by
    the gate and chosen; the folder loads with the tokenizer it was written from, and the file alone tokenizes
    the same."""
    from pipeline import formats
    from pipeline.cli import main

    path = make_recipe(llama2["folder"], finetune={"enabled": False}, distill={"enabled": False},
                       evaluate={"enabled": False},
                       quantize={"candidates": [{"method": "gguf-q8_0"}], "max_ppl_increase": 5.0, "speed_tokens": 0})
    assert main(["run", str(path)]) == 0
    out = tmp_path / "runs" / "tiny" / "quantize"
    row = tiny.record(out)["candidates"][0]
    assert row["status"] == "passed" and abs(row["ppl_increase_pct"]) < 1, row
    assert fields(out / "tiny-Q8_0.gguf")["tokenizer.ggml.model"] == "llama"
    _, folder_tok = formats.load_folder(out)
    file_tok = reloaded(out / "tiny-Q8_0.gguf")
    for text in TEXTS:
        assert folder_tok(text).input_ids == file_tok(text).input_ids == llama2["tokenizer"](text).input_ids, text
