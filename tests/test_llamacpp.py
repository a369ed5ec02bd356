"""llama.cpp (llama-cpp-python) as the client of the GGUF files we write: every type, tiny GPT-2 and Llama
and SmolLM2. Its tokenization of a sample equals the Hugging Face tokenizer's, and its perplexity on the
same token ids is within 1% of what transformers gives for the same file. Slow: needs the optional
`[llamacpp]` extra (`make install-llamacpp`, a source build of llama.cpp)."""
import pytest

from pipeline import data, models
from pipeline import llamacpp
from pipeline.formats import gguf as gguf_export
from pipeline.metrics import perplexity

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llamacpp)")

SAMPLE = "The Python interpreter reads 2024 lines:\n\tdef f(x): return x ** 2  # café, naïve — ok?"
WINDOW = {"context": 128, "stride": 64}


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory):
    """Model folders to export: the tiny ones, and SmolLM2 as the load stage writes it (from its GGUF)."""
    from pipeline.folders import save_model

    folder = tmp_path_factory.mktemp("smollm2") / "base"
    alias = models.resolve("smollm2-135m")
    save_model(folder, models.load_model(alias), models.load_tokenizer(alias))
    (folder / "pipeline.json").write_text(f'{{"stage": "base", "recipe": "smollm2", "parent": "{alias.label}"}}')
    return {**tiny_models, "smollm2": folder}


@pytest.mark.parametrize("qtype", list(gguf_export.TYPES))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "smollm2"])
def test_llamacpp_reads_every_type_like_transformers(arch, qtype, sources, tmp_path):
    folder = sources[arch]
    path = gguf_export.write(folder, tmp_path / gguf_export.filename(arch, qtype), qtype, arch)
    tokenizer = models.load_tokenizer(models.Source("folder", str(folder)))
    llm = llamacpp.load(path, WINDOW["context"])
    assert llamacpp.tokenize(llm, SAMPLE) == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    ids = tokenizer(data.stdlib_corpus_file().read_text()[:4000], add_special_tokens=False)["input_ids"][:512]
    ours = llamacpp.perplexity(llm, ids, **WINDOW)
    transformers_ppl = perplexity(models.load_model(models.Source("gguf", str(tmp_path), path.name)), ids,
                                  **WINDOW)
    assert ours["scored_tokens"] == transformers_ppl["scored_tokens"] == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(transformers_ppl["perplexity"], rel=0.01)
    timed = llamacpp.speed(llm, ids[:64], [ids[:8], ids[8:16]], 4)
    assert timed["gen_tok_s"] > 0 and timed["prefill_tok_s"] > 0


@pytest.mark.parametrize("prefix,add_bos,arch", [("normalizer", True, "llama"), ("normalizer", False, "llama"),
                                                 ("metaspace", True, "llama"), ("none", True, "gemma2")])
def test_llamacpp_tokenizes_our_sentencepiece_files_as_the_source_tokenizer(prefix, add_bos, arch, tmp_path):
    """The SentencePiece-style files the GGUF export writes (Llama 2 / TinyLlama, Mistral v0.3's Metaspace, Gemma's
    no space prefix; with and without BOS), read by llama.cpp itself: its ids for plain text are the source
    tokenizer's, it adds BOS exactly when the tokenizer does, and its logits are transformers' on the same ids.
    Where llama.cpp departs from the source tokenizer (Metaspace after a leading space: it always adds "▁", see
    docs), the expectation is the file's own tokenizer, which the export warns about."""
    import numpy as np
    import torch
    from test_gguf_sentencepiece import TEXTS, export, reloaded, source

    folder, tok, model = source(tmp_path, prefix=prefix, add_bos=add_bos, arch=arch)
    path = export(folder, "f16", tmp_path / "out")
    llm = llamacpp.load(path, 64)
    expected = reloaded(path) if prefix == "metaspace" else tok
    for text in [t for t in TEXTS if t and "<s>" not in t and "</s>" not in t]:
        assert llamacpp.tokenize(llm, text) == expected(text, add_special_tokens=False).input_ids, text
        with_bos = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert with_bos == expected(text).input_ids, text
    if prefix == "metaspace":  # the documented departure: llama.cpp puts "▁" before a leading space too
        assert llamacpp.tokenize(llm, " one") != tok(" one", add_special_tokens=False).input_ids
    ids = tok("The Python interpreter reads 2024 lines").input_ids
    llm.reset()
    llm.eval(ids)
    ours = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 0.05 * max(1.0, np.abs(theirs).max()), np.abs(ours - theirs).max()


def test_llamacpp_tokenizes_smollm2s_file_as_transformers_runs_of_spaces_before_digits_included(sources, tmp_path):
    """Once (with a file written under another pre-tokenizer name) llama.cpp kept a run of spaces before a digit as
    one token where the Hugging Face tokenizer splits it, and every id after the first such place differed. The
    file written now (`tokenizer.ggml.pre` smollm: single digits, then GPT-2's regex) tokenizes alike, on such
    runs and on a long text of Python docs and code."""
    import pydoc_data.topics

    folder = sources["smollm2"]
    path = gguf_export.write(folder, tmp_path / "smollm2-q8_0.gguf", "q8_0", "smollm2")
    tokenizer = models.load_tokenizer(models.Source("folder", str(folder)))
    llm = llamacpp.load(path, 64)
    texts = ["x  12", "x   2024 and", "value =    3", "a\t\t12", "  42", "    return x  +  1000\n"]
    texts.append("\n".join(list(pydoc_data.topics.topics.values())[5:15])[:20000])
    for text in texts:
        assert llamacpp.tokenize(llm, text) == tokenizer(text, add_special_tokens=False).input_ids, text[:40]
