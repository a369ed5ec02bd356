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
