"""The load stage's source check: a tokenizer that splits words its own vocabulary holds whole, or that leaves
out a BOS token the model was trained with, or a model that predicts the validation text worse than lzma packs
it (random weights, a broken tokenizer, a BOS it needs and does not get), is refused (exit 2, no folder), or
run with check_source: false and named at the top of the report."""
import json
import shutil

import pytest
import torch

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tiny
from pipeline import source_check
from pipeline.cli import main
from pipeline.formats import gguf as gguf_export
from pipeline.models import Source

TEXT = " ".join(["The Python interpreter reads the source file and runs each statement in order."] * 40)


def _without_merges(tokenizer) -> PreTrainedTokenizerFast:
    """The same vocabulary, but a BPE model with no merges: every word falls apart into characters, as the
    words of a mis-converted GGUF vocabulary did."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = []
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tiny.EOS,
                                   bos_token=tiny.EOS, pad_token=tiny.EOS)


def _folder(tmp_path, tokenizer, name="m", weights=None, **config) -> str:
    """A model folder with `tokenizer`: the weights of the model folder `weights`, else a random tiny Llama."""
    folder = tmp_path / name
    if weights:
        folder.mkdir()
        for file in ("config.json", "model.safetensors", "generation_config.json"):
            if (weights / file).is_file():
                shutil.copy(weights / file, folder / file)
    else:
        tiny.build_model("llama", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return str(folder)


def test_whole_words_tells_a_sound_tokenizer_from_one_that_splits_its_own_words(tokenizer):
    sound = source_check.whole_words(tokenizer, TEXT)
    broken = source_check.whole_words(_without_merges(tokenizer), TEXT)
    assert sound["vocabulary_words"] == broken["vocabulary_words"] >= source_check.MIN_WORDS
    assert sound["kept_whole"] == 1.0 and broken["kept_whole"] == 0.0
    assert broken["tokens_per_word"] > 2 * sound["tokens_per_word"]
    # too few words the vocabulary knows: no verdict rather than a guess
    assert source_check.check(Source("folder", "."), _without_merges(tokenizer), "The end.")[1] == []


def test_a_broken_tokenizer_is_refused_and_with_check_source_false_the_report_says_so(tokenizer, trained_llama,
                                                                                    make_recipe, tmp_path, capsys):
    folder = _folder(tmp_path, _without_merges(tokenizer), weights=trained_llama)  # trained, on the sound tokens
    recipe = make_recipe(folder, check_source=True)
    assert main(["run", str(recipe), "--stages", "load"]) == 2
    err = capsys.readouterr().err
    assert "splits words its own vocabulary holds whole" in err and "check_source: false" in err
    # and the model, given the text cut into characters, predicts it worse than lzma: the gate says why
    assert "bits per byte" in err and "Likely cause: the tokenizer that splits words" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "tiny" / "base").exists()
    overrides = ["check_source=false", "evaluate.speed=false", "evaluate.samples=false", "evaluate.task.enabled=false",
                 "evaluate.models=[base]"]
    assert main(["run", str(recipe), "--stages", "load,evaluate", *overrides]) == 0
    found = tiny.record(tmp_path / "runs" / "tiny" / "base")["source_check"]
    assert found["kept_whole"] < source_check.MIN_WHOLE and len(found["problems"]) == 2
    assert found["bits_per_byte"] > min(found["compressor_bits_per_byte"].values())
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Warning: the source model failed the load stage's check")


def test_a_bos_the_source_asks_for_is_restored(tokenizer, trained_llama, make_recipe, tmp_path):
    folder = _folder(tmp_path, tokenizer, weights=trained_llama, add_bos_token=True)
    assert not source_check.adds_bos(AutoTokenizer.from_pretrained(folder))  # what transformers 5 loads
    assert main(["run", str(make_recipe(folder, check_source=True)), "--stages", "load"]) == 0
    base = tmp_path / "runs" / "tiny" / "base"
    assert tiny.record(base)["source_check"] == {**tiny.record(base)["source_check"], "bos_restored": True,
                                                 "adds_bos": True}
    reloaded = AutoTokenizer.from_pretrained(base)
    assert reloaded("The").input_ids[0] == reloaded.bos_token_id  # the saved base tokenizer keeps it


def test_a_bos_asked_for_by_a_gguf_file_is_restored(tokenizer, make_recipe, tmp_path):
    with_bos = AutoTokenizer.from_pretrained(_folder(tmp_path, tokenizer))
    assert source_check.restore_bos(with_bos)
    path = gguf_export.write(_folder(tmp_path, with_bos, "bos"), tmp_path / "m-Q8_0.gguf", "q8_0", "m")
    source = Source("gguf", str(tmp_path), path.name)
    assert source_check.intended_bos(source) is True  # tokenizer.ggml.add_bos_token
    assert source_check.intended_bos(Source("folder", _folder(tmp_path, tokenizer, "plain"))) is None
    assert main(["run", str(make_recipe(path)), "--stages", "load"]) == 0
    base = tmp_path / "runs" / "tiny" / "base"
    assert tiny.record(base)["source_check"]["adds_bos"] is True
    reloaded = AutoTokenizer.from_pretrained(base)
    assert reloaded("The").input_ids[0] == reloaded.bos_token_id


def test_a_bos_that_cannot_be_added_is_refused(tokenizer, trained_llama, make_recipe, tmp_path, capsys):
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tiny.EOS,
                                     pad_token=tiny.EOS)
    folder = _folder(tmp_path, no_bos, weights=trained_llama, add_bos_token=True)
    assert main(["run", str(make_recipe(folder, check_source=True)), "--stages", "load"]) == 2
    assert "adds the BOS token" in capsys.readouterr().err


def test_the_gate_passes_a_trained_model_and_refuses_the_same_model_untrained(tokenizer, trained_llama, make_recipe,
                                                                             tmp_path, capsys):
    assert main(["run", str(make_recipe(trained_llama, check_source=True)), "--stages", "load"]) == 0
    found = tiny.record(tmp_path / "runs" / "tiny" / "base")["source_check"]
    compressors = found["compressor_bits_per_byte"]
    assert found["bits_per_byte"] < 0.8 * min(compressors.values()) and "problems" not in found
    assert found["scored_tokens"] > 2000 and found["sample_tokens_per_word"] > 1  # a bounded sample, recorded
    assert set(found["bos_bits_per_byte"]) == {"with", "without"}  # its tokenizer adds no BOS: tried with one
    # the same architecture and tokenizer, weights never trained: worse than lzma, refused with the numbers
    untrained = _folder(tmp_path, tokenizer, "untrained")
    assert main(["run", str(make_recipe(untrained, name="untrained", check_source=True)), "--stages", "load"]) == 2
    err = capsys.readouterr().err
    assert "bits per byte" in err and f"lzma {compressors['lzma']:.2f}" in err and "check_source: false" in err
    assert "initialised at random" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "untrained" / "base").exists()


class _NeedsBos(torch.nn.Module):
    """A model that predicts well only after its BOS token, as Gemma does: the trained model's logits when the
    window starts with BOS, flat ones (no idea) when it does not."""

    def __init__(self, model, bos: int):
        super().__init__()
        self.model, self.bos, self.config = model, bos, model.config

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        if input_ids[0, 0] != self.bos:
            out.logits = torch.zeros_like(out.logits)
        return out


@pytest.mark.parametrize("needs_bos", [False, True])
def test_a_bos_the_model_needs_and_does_not_get_is_refused(needs_bos, tokenizer, trained_llama, make_recipe,
                                                           tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    import pipeline.stages.load as load

    trained = AutoModelForCausalLM.from_pretrained(trained_llama)
    model = _NeedsBos(trained, tokenizer.bos_token_id) if needs_bos else trained
    monkeypatch.setattr(load.models, "load_model", lambda *a, **k: model)
    assert not source_check.adds_bos(tokenizer)  # the tokenizer adds none, and its files do not ask for one
    code = main(["run", str(make_recipe(trained_llama, check_source=True)), "--stages", "load"])
    err = capsys.readouterr().err
    assert code == (2 if needs_bos else 0), err
    if needs_bos:
        assert f"the model needs a BOS token its tokenizer does not add: with {tokenizer.bos_token!r} put first" in err
        assert "add_bos_token: true" in err and "check_source: false" in err
        assert "Likely cause: the missing BOS" in err  # flat logits: 9 bits per token, past lzma too


def _spm_gguf(path, texts, vocab_size=800):
    """A GGUF file with a SentencePiece-style vocabulary as llama.cpp's converter writes Llama 2 / Mistral ones
    (`tokenizer.ggml.model` llama: tokens, scores, types, no merges, add_bos_token), for a tiny Llama; and the
    SentencePiece BPE tokenizer it was made from, as the reference."""
    import gguf
    import numpy as np
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = SentencePieceBPETokenizer(add_prefix_space=True)
    reference.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    vocab = reference.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokens),
                                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_export._hyperparameters(writer, model.config, len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])  # earlier merges score higher
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    for name, array in gguf_export.tensors(model, gguf.MODEL_ARCH.LLAMA):
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def test_a_sentencepiece_gguf_tokenizes_as_its_vocabulary_says_with_its_bos(make_recipe, tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    reference = _spm_gguf(tmp_path / "spm.gguf", texts)
    assert main(["run", str(make_recipe(tmp_path / "spm.gguf")), "--stages", "load"]) == 0
    base = tmp_path / "runs" / "tiny" / "base"
    check = tiny.record(base)["source_check"]
    # the pipeline's GGUF loader adds the BOS the file asks for itself (transformers' converter left it out)
    assert check["adds_bos"] is True and "bos_restored" not in check and check["kept_whole"] > source_check.MIN_WHOLE
    loaded = AutoTokenizer.from_pretrained(base)
    for text in (TEXT, texts[7][:500], "x = [i ** 2 for i in range(10)]"):
        assert loaded(text).input_ids == [1] + reference.encode(text).ids, text
