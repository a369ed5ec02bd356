"""GGUF export: tiny GPT-2 and Llama written as GGUF, read back by transformers (`gguf_file=`) and by
`gguf.GGUFReader`; the gguf-* quantize candidates through the gate, evaluate and generate."""
import json

import pytest
import torch
from gguf import GGUFReader, TokenType
from transformers import AutoModelForCausalLM

from pipeline import data, formats, llamacpp, models, push, recipe, records
from pipeline.cli import main
from pipeline.formats import gguf as gguf_export
from pipeline.metrics import perplexity
from tiny import bench_module, record as _record

IDS = torch.arange(1, 33).unsqueeze(0)
TEXT = "The Python interpreter reads 2024 lines:\n\tdef f(x): return x ** 2  # café, naïve — ok?"
# max |logit difference| to the float32 source: a random tiny model's logits are within about ±1
TOLERANCE = {"f16": 2e-3, "q8_0": 0.03, "q5_0": 0.15, "q5_1": 0.15, "q4_0": 0.3, "q4_1": 0.3}


def logits(model):
    with torch.no_grad():
        return model(IDS, attention_mask=torch.ones_like(IDS)).logits


def fields(path) -> dict:
    reader = GGUFReader(path)
    out = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    out["tensors"] = {t.name: (t.tensor_type.name, t.shape.tolist()) for t in reader.tensors}
    return out


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Every type for both architectures, written once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, folder in tiny_models.items():
        for qtype in gguf_export.TYPES:
            out[arch, qtype] = gguf_export.write(folder, root / gguf_export.filename(f"tiny-{arch}", qtype), qtype,
                                                 f"tiny-{arch}")
    return out


@pytest.mark.parametrize("qtype", list(gguf_export.TYPES))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_round_trip_through_transformers_gguf_loader(arch, qtype, exported, tiny_models, tokenizer):
    path = exported[arch, qtype]
    assert path.name == f"tiny-{arch}-{gguf_export.TYPES[qtype][2]}.gguf"
    source = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    # the file alone, as a user loads it: weights, config and tokenizer all from GGUF metadata
    model = models.load_model(models.Source("gguf", str(path.parent), path.name))
    gguf_tok = models.load_tokenizer(models.Source("gguf", str(path.parent), path.name))
    assert type(model) is type(source)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(model.config, key) == getattr(source.config, key), key
    if arch == "llama":
        assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    err = (logits(model) - logits(source)).abs().max().item()
    assert 0 < err < TOLERANCE[qtype], err  # quantized for real, and the layout (permute, transpose) is right
    # the tied head was written once and is tied again on load
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # the tokenizer read back from the GGUF vocabulary and merges tokenizes exactly as the source one
    assert gguf_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert gguf_tok.get_vocab() == tokenizer.get_vocab()
    assert gguf_tok.decode(tokenizer(TEXT)["input_ids"]) == TEXT


def test_metadata_read_back_with_gguf_reader(exported, tokenizer, tiny_models):
    merges = json.loads((tiny_models["llama"] / "tokenizer.json").read_text())["model"]["merges"]
    llama = fields(exported["llama", "q8_0"])
    expected = {
        "general.architecture": "llama", "general.type": "model", "general.name": "tiny-llama",
        "general.file_type": 7, "general.quantization_version": 2,  # LlamaFileType.MOSTLY_Q8_0
        "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 4,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.vocab_size": 512,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expected.items():
        assert llama[key] == value, key
    assert llama["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert llama["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokens, types = llama["tokenizer.ggml.tokens"], llama["tokenizer.ggml.token_type"]
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(512)]
    assert types[0] == TokenType.CONTROL and set(types[1:]) == {TokenType.NORMAL}  # <|endoftext|> is special
    assert llama["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    # tied embedding once, Q8_0; every projection Q8_0 (GGUF shapes are (in, out)); norms F32
    t = llama["tensors"]
    assert "output.weight" not in t and t["token_embd.weight"] == ("Q8_0", [64, 512])
    assert t["blk.0.attn_k.weight"] == ("Q8_0", [64, 32]) and t["blk.3.ffn_down.weight"] == ("Q8_0", [128, 64])
    assert t["blk.0.attn_norm.weight"][0] == t["output_norm.weight"][0] == "F32"
    assert len(t) == 2 + 4 * 9
    gpt2 = fields(exported["gpt2", "q4_0"])
    for key, value in {"general.architecture": "gpt2", "general.file_type": 2, "gpt2.context_length": 256,
                       "gpt2.embedding_length": 64, "gpt2.feed_forward_length": 256, "gpt2.block_count": 4,
                       "gpt2.attention.head_count": 4, "tokenizer.ggml.pre": "gpt-2"}.items():
        assert gpt2[key] == value, key
    assert gpt2["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    t = gpt2["tensors"]
    # Conv1D (in, out) written as Linear (out, in), which GGUF lists reversed; the tied head stays Q8_0 in 4-bit
    assert t["blk.0.attn_qkv.weight"] == ("Q4_0", [64, 192]) and t["blk.0.ffn_up.weight"] == ("Q4_0", [64, 256])
    assert t["token_embd.weight"] == ("Q8_0", [64, 512]) and "output.weight" not in t
    assert t["position_embd.weight"] == ("F32", [64, 256]) and t["blk.0.attn_qkv.bias"][0] == "F32"
    assert fields(exported["gpt2", "f16"])["tensors"]["token_embd.weight"][0] == "F16"


def test_special_tokens_chat_template_and_pre_tokenizer_lineage(tokenizer, tmp_path, make_recipe):
    """A SmolLM-style tokenizer (digits split one by one) with a chat template and an added special token:
    all of it lands in the GGUF; a model loaded back from that GGUF keeps "smollm" through the lineage."""
    from tokenizers import pre_tokenizers

    import tiny

    tok = tiny.build_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    folder = tmp_path / "smol"
    model = tiny.build_model("llama", tok)  # 513 tokens: the embedding covers the added one
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    path = gguf_export.write(folder, tmp_path / "smol-Q8_0.gguf", "q8_0", "smol")
    meta = fields(path)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.token_type"][512] == TokenType.CONTROL and meta["tokenizer.ggml.tokens"][512] == "<|im_start|>"
    # the load stage rebuilds the tokenizer from GGUF (plain GPT-2 regex); exporting it again keeps "smollm"
    recipe = make_recipe(path, quantize={"candidates": [{"method": "gguf-q8_0"}], "speed_tokens": 0},
                         evaluate={"enabled": False})
    assert main(["run", str(recipe), "--stages", "load"]) == 0
    base = tmp_path / "runs" / "tiny" / "base"
    # the quantize stage passes the source the base was loaded from (records.origin): its name is kept
    again = gguf_export.write(base, tmp_path / "again-Q8_0.gguf", "q8_0", "again", origin=records.origin(base))
    assert fields(again)["tokenizer.ggml.pre"] == "smollm"
    assert gguf_export.pre_tokenizer(formats.load_folder(base)[1]) == "gpt-2"  # what the structure alone says


def test_a_prune_that_makes_the_model_unwritable_fails_at_validation(tiny_models, make_recipe, capsys):
    """GPT-2 with a pruned MLP (n_inner != 4 x n_embd) cannot go through GGUF: said before any training."""
    gguf = {"candidates": [{"method": "gguf-q8_0"}]}
    path = make_recipe(tiny_models["gpt2"], prune={"enabled": True, "intermediate_size": 128}, quantize=gguf)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "quantize.candidates[0].method: gguf-q8_0 cannot write the pruned model" in err and "n_inner=128" in err
    # cutting layers keeps the MLP width: fine; and quantize given a folder of its own is judged by that folder
    assert main(["validate", str(path), "prune.intermediate_size=null", "prune.num_hidden_layers=2"]) == 0
    assert main(["validate", str(path), f"quantize.input={tiny_models['gpt2']}"]) == 0


def test_quantize_whose_candidates_all_fail_says_so_not_to_raise_the_budget(tiny_models, make_recipe, capsys):
    path = make_recipe(tiny_models["gpt2"], finetune={"enabled": False}, distill={"enabled": False},
                       evaluate={"enabled": False}, quantize={"candidates": [{"method": "gguf-q8_0"}]})
    # the base folder of a GPT-2 whose MLP is not 4 x n_embd: validation cannot see it, the stage must say why
    assert main(["run", str(path), "--stages", "load"]) == 0
    base = path.parent / "runs" / "tiny" / "base"
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    for name in list(weights):
        if name.endswith("mlp.c_fc.weight"):
            weights[name] = weights[name][:, :128].contiguous()
        elif name.endswith("mlp.c_fc.bias"):
            weights[name] = weights[name][:128].contiguous()
        elif name.endswith("mlp.c_proj.weight"):
            weights[name] = weights[name][:128].contiguous()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert main(["run", str(path), "--stages", "quantize"]) == 2
    err = capsys.readouterr().err
    assert "no candidate could be made" in err and "n_inner=128" in err and "max_ppl_increase" not in err


def test_unsupported_architecture_fails_at_validation(tmp_path, tokenizer, make_recipe, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                             vocab_size=len(tokenizer), max_position_embeddings=64,
                             word_embed_proj_dim=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = make_recipe(folder, quantize={"candidates": [{"method": "bnb-int8"}, {"method": "gguf-q8_0"}]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "quantize.candidates[1].method: gguf-q8_0 cannot write this model: GGUF export supports gpt2" in err
    assert "llama" in err and "this model is 'opt'" in err and "1 problem(s)" in err
    with pytest.raises(gguf_export.GGUFExportError, match="this model is 'opt'"):
        gguf_export.write(folder, tmp_path / "x.gguf", "q8_0", "x")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written
    # with a width cut this architecture cannot take either, both problems are named at once
    assert main(["validate", str(path), "prune.enabled=true", "prune.target_params=0.8"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "prune.axes: width pruning supports" in err and "gguf-q8_0 cannot write" in err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_output_tensor_type_keeps_the_head_at_f16(arch, tiny_models, exported, tmp_path):
    """llama-quantize's --output-tensor-type: the output head (here the tied embedding, written once) in F16,
    every block weight still Q8_0; the head's round trip is then exact to F16, so the logits move closer to
    the source's than the plain Q8_0 file's."""
    path = gguf_export.write(tiny_models[arch], tmp_path / "tiny-Q8_0.gguf", "q8_0", "tiny", output_type="f16")
    tensors = fields(path)["tensors"]
    plain = fields(exported[arch, "q8_0"])["tensors"]
    assert tensors["token_embd.weight"][0] == "F16" and plain["token_embd.weight"][0] == "Q8_0"
    assert {n: t for n, t in tensors.items() if n != "token_embd.weight"} == \
        {n: t for n, t in plain.items() if n != "token_embd.weight"}
    assert "output.weight" not in tensors
    source = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    head_f16 = models.load_model(models.Source("gguf", str(tmp_path), path.name))
    q8 = exported[arch, "q8_0"]
    head_q8 = models.load_model(models.Source("gguf", str(q8.parent), q8.name))
    emb = lambda m: m.get_input_embeddings().weight  # noqa: E731
    assert torch.allclose(emb(head_f16), emb(source).half().float())
    assert (logits(head_f16) - logits(source)).abs().max() < (logits(head_q8) - logits(source)).abs().max()
    problems = recipe_problems({"method": "gguf-q8_0", "output_tensor_type": "q4_0"}) + \
        recipe_problems({"method": "openvino-int8", "output_tensor_type": "f16"})
    assert any("output_tensor_type" in p and "'f16', 'q8_0'" in p for p in problems), problems
    assert any("output_tensor_type: does not apply to openvino-int8" in p for p in problems), problems


def recipe_problems(candidate: dict) -> list[str]:
    """What recipe validation says of one quantize candidate: type errors, then the candidate's own checks."""
    from pipeline.config import parse
    from pipeline.quant_backends import Candidate

    errors: list[str] = []
    parse(Candidate, candidate, "quantize.candidates[0]", errors)
    return errors


def test_quantize_gguf_candidates_gate_evaluate_and_generate(tiny_models, make_recipe, tokenizer, capsys):
    candidates = [{"method": "gguf-f16"}, {"method": "gguf-q8_0"}, {"method": "gguf-q4_0"}]
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={"candidates": candidates, "max_ppl_increase": 5.0, "speed_tokens": 2},
                       evaluate={"models": ["base", "quantize"], "max_tokens": 512, "samples": False})
    assert main(["run", str(path)]) == 0
    out = path.parent / "runs" / "tiny" / "quantize"
    rec = _record(out)
    rows = {r["name"]: r for r in rec["candidates"]}
    assert [r["status"] for r in rows.values()] == ["passed"] * 3, rows
    assert rows["gguf-f16"]["backend"] == "gguf" and rows["gguf-q4_0"]["bits"] == 4
    assert rows["gguf-q4_0"]["disk_mb"] < rows["gguf-q8_0"]["disk_mb"] < rows["gguf-f16"]["disk_mb"]
    assert rec["chosen"] == "gguf-q4_0" and rec["backend_versions"]["gguf"]
    files = sorted(p.name for p in out.iterdir())
    assert "tiny-Q4_0.gguf" in files and "tokenizer.json" in files and "config.json" not in files
    assert not any(f.endswith(".safetensors") for f in files)
    # the gate scored the shipped file: the .gguf reloaded with transformers on its own, same windows
    shipped = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny-Q4_0.gguf")
    r = recipe.load(path)
    ids = data.eval_stream(data.prepare(r.data, tokenizer, r.seed)["validation"])
    expected = perplexity(shipped, ids, 64, 32, 512)["perplexity"]
    assert rows["gguf-q4_0"]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert rows["gguf-f16"]["ppl_increase_pct"] == pytest.approx(0, abs=0.05)
    assert abs(rows["gguf-q4_0"]["ppl_increase_pct"]) > abs(rows["gguf-q8_0"]["ppl_increase_pct"])
    assert formats.disk_size(out) == (out / "tiny-Q4_0.gguf").stat().st_size
    # evaluate scores the same file; the card is a GGUF card with llama.cpp / Ollama commands
    report = {r["name"]: r for r in json.loads((out.parent / "report.json").read_text())["models"]}
    assert report["quantize"]["perplexity"] == pytest.approx(rows["gguf-q4_0"]["perplexity"], rel=1e-6)
    assert report["quantize"]["params"] == report["base"]["params"]
    if llamacpp.available():  # llama.cpp's own score of the same file and tokens (tests/test_llamacpp.py checks more)
        ours = report["quantize"]["llamacpp"]
        assert ours["evaluations"][0]["perplexity"] == pytest.approx(report["quantize"]["perplexity"], rel=0.01)
        assert ours["tokenization_matches"] and ours["gen_tok_s"] > 0
    else:
        assert report["quantize"]["llamacpp"] == {"skipped": "llama-cpp-python not installed"}
    assert "llamacpp" not in report["base"]
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: gguf" in meta and "- gguf" in meta
    assert "llama-cli -m tiny-Q4_0.gguf" in card and "hf.co/<user>/<repo>:Q4_0" in card
    assert 'gguf_file="tiny-Q4_0.gguf"' in card
    plan = push.dry_run(r, ["quantize"])
    assert "ollama run hf.co/<user>/tiny-quantize:Q4_0" in plan and "tiny-Q4_0.gguf" in plan
    capsys.readouterr()
    # generate reads the GGUF folder (and the file itself)
    assert main(["generate", str(out), "The list", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(out / "tiny-Q4_0.gguf"), "The list", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0] == printed[1] and printed[0].startswith("The list")


def test_quantize_bench_lists_gguf_candidates():
    bench_quantize = bench_module("quantize")

    assert {"gguf-q8_0", "gguf-q5_0", "gguf-q4_0"} <= set(bench_quantize.PRESETS)
    args = bench_quantize.parse_args(["--candidates", "gguf-q8_0", "openvino-int8"])
    assert args.candidates == ["gguf-q8_0", "openvino-int8"]


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_round_trip(arch, qtype, tokenizer, tmp_path):
    """Mistral is written as llama.cpp's llama architecture (q/k permuted for its rope, as its GGUF files are;
    transformers reads it back as a Llama); Qwen2 as qwen2, with its q/k/v biases and rotate-half rope kept."""
    import tiny

    model = tiny.build_model(arch, tokenizer).eval()
    if arch == "mistral":
        assert "slides a 16-token window" in gguf_export.unsupported(model.config)  # not what llama.cpp runs
        model.config.sliding_window = None
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    assert gguf_export.unsupported(model.config) is None
    path = gguf_export.write(tmp_path / arch, tmp_path / f"tiny-{qtype}.gguf", qtype, "tiny")
    assert fields(path)["general.architecture"] == {"mistral": "llama", "qwen2": "qwen2"}[arch]
    back = models.load_model(models.Source("gguf", str(tmp_path), path.name)).eval()
    assert type(back).__name__ == {"mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    err = (logits(back) - logits(model)).abs().max().item()
    assert 0 < err < TOLERANCE[qtype], err


def family_model(arch: str, tokenizer, **changes):
    """tests/tiny.py's two-layer model of `arch`, rebuilt (same seed) with `changes` to its config."""
    import tiny

    model = tiny.build_model(arch, tokenizer, layers=2)
    if changes:
        for key, value in changes.items():
            setattr(model.config, key, value)
        torch.manual_seed(0)
        model = type(model)(model.config)
    return model.eval()


# What each family needs to be written (the tiny configs' head_dim 16 is refused, see below): transformers'
# GGUF loader reads no head_dim for qwen3 (its default 128 comes back); llama.cpp scales Gemma attention by
# 1/sqrt(head_dim) and transformers reloads query_pre_attn_scalar as its default 256, so head_dim 256.
WRITABLE = {"qwen3": {"head_dim": 128}, "phi3": {}, "gemma2": {"head_dim": 256}, "gemma3": {"head_dim": 256}}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", list(WRITABLE))
def test_qwen3_phi3_gemma2_gemma3_round_trip(arch, qtype, tokenizer, tmp_path):
    """Each written as its own llama.cpp architecture and read back by transformers' GGUF loader with the
    same logits: Qwen3's q/k norms, Phi-3's fused qkv / gate_up kept fused, Gemma's (1 + w) norms stored as
    w + 1 (what llama.cpp multiplies by; transformers subtracts the 1 again), Gemma 2's soft-caps and both
    Gemmas' 16-token sliding window (the 32 positions scored run past it)."""
    model = family_model(arch, tokenizer, **WRITABLE[arch])
    assert gguf_export.unsupported(model.config) is None
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    path = gguf_export.write(tmp_path / arch, tmp_path / f"tiny-{qtype}.gguf", qtype, "tiny")
    meta = fields(path)
    t = meta["tensors"]
    assert meta["general.architecture"] == arch
    head_dim = WRITABLE[arch].get("head_dim", 16)
    assert meta[f"{arch}.attention.key_length"] == head_dim and meta[f"{arch}.block_count"] == 2
    if arch == "phi3":  # q | k | v rows (4 + 2 + 2 heads of 16) and gate | up, as llama.cpp's phi3 splits them
        assert t["blk.0.attn_qkv.weight"][1] == [64, 128] and t["blk.0.ffn_up.weight"][1] == [64, 256]
        assert "blk.0.attn_q.weight" not in t and "blk.0.ffn_gate.weight" not in t and "output.weight" in t
    else:
        assert t["blk.0.attn_q.weight"][1] == [64, 4 * head_dim] and "output.weight" not in t  # tied
    if arch in ("qwen3", "gemma3"):
        assert t["blk.0.attn_q_norm.weight"] == ("F32", [head_dim]) and "blk.0.attn_k_norm.weight" in t
    if arch.startswith("gemma"):
        assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"} <= set(t)
        assert meta[f"{arch}.attention.sliding_window"] == 16
        norm = next(x for x in GGUFReader(path).tensors if x.name == "blk.0.attn_norm.weight")
        hf = model.model.layers[0].input_layernorm.weight.detach().numpy()
        assert torch.allclose(torch.tensor(norm.data.copy()), torch.tensor(hf) + 1)  # (1 + w) as llama.cpp's w
    if arch == "gemma2":
        assert meta["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
        assert meta["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    back = models.load_model(models.Source("gguf", str(tmp_path), path.name)).eval()
    assert type(back) is type(model)
    if arch != "phi3":  # (Phi3Config has no head_dim: hidden_size / heads)
        assert back.config.head_dim == head_dim
    if arch.startswith("gemma"):
        assert back.config.sliding_window == 16 and back.config.layer_types == model.config.layer_types
    err = (logits(back) - logits(model)).abs().max().item()
    assert 0 < err < TOLERANCE[qtype], err


@pytest.mark.parametrize("arch, changes, reason", [
    ("qwen3", {}, "reads no head_dim for qwen3 files and would reload this model with head_dim=128; this model has 16"),
    ("gemma2", {}, "llama.cpp scales gemma2 attention by 1/sqrt(head_dim) = 1/sqrt(16)"),
    ("gemma2", {"head_dim": 256, "attn_logit_softcapping": None},
     "reads no attn_logit_softcapping for gemma2 files and would reload this model with attn_logit_softcapping=50.0"),
    ("gemma2", {"head_dim": 256, "tie_word_embeddings": False}, "gemma2 architecture has no separate output head"),
    ("gemma3", {"head_dim": 256, "layer_types": ["full_attention", "sliding_attention"]},
     "reads no layer_types for gemma3 files"),
    ("phi3", {"sliding_window": 16}, "phi3 architecture attends to the whole context"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "reads no rope_parameters for phi3 files"),
])
def test_what_the_gguf_loader_would_not_read_back_is_refused(arch, changes, reason, tokenizer):
    """A config transformers would reload as another model (a key it does not read, left at a non-default
    value) or llama.cpp would run differently is refused with the reason, before anything is written."""
    model = family_model(arch, tokenizer)
    for key, value in changes.items():
        setattr(model.config, key, value)
    assert reason in gguf_export.unsupported(model.config)


@pytest.mark.parametrize("arch, name, reason", [
    ("gemma", "Gemma", "transformers' GGUF loader reads no 'gemma' (Gemma 1) architecture"),
    ("gpt_neox", "GPT-NeoX", "transformers' GGUF loader reads no 'gptneox' architecture"),
])
def test_families_transformers_cannot_reload_are_refused_at_validation(arch, name, reason, tokenizer, make_recipe,
                                                                       tmp_path, capsys):
    import tiny
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    # the reason holds for the installed transformers (when this fails, it learned the architecture: write it)
    assert {"gemma", "gptneox"}.isdisjoint(GGUF_CONFIG_MAPPING) and {"gemma2", "gemma3"} <= set(GGUF_CONFIG_MAPPING)
    folder = tiny.save_tiny(tmp_path / arch, arch, tokenizer, layers=1)
    path = make_recipe(folder, quantize={"candidates": [{"method": "gguf-q8_0"}]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"gguf-q8_0 cannot write this model: GGUF export cannot write {name}" in err and reason in err
    with pytest.raises(gguf_export.GGUFExportError, match="reads no"):
        gguf_export.write(folder, tmp_path / "x.gguf", "q8_0", "x")


def test_qwen_pre_tokenizer_is_named_qwen2(tmp_path):
    """Qwen2 / Qwen3 tokenizers split with Qwen2's regex (single digits) before ByteLevel: llama.cpp's "qwen2"
    (Llama 3's regex, which groups up to three digits, stays "llama-bpe")."""
    from tokenizers import Regex, pre_tokenizers

    import tiny

    tok = tiny.build_tokenizer()
    for split, name in ((gguf_export.LLAMA3_SPLIT, "llama-bpe"), (gguf_export.QWEN2_SPLIT, "qwen2")):
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        assert gguf_export.pre_tokenizer(tok) == name
    model = family_model("qwen3", tok, **WRITABLE["qwen3"])
    model.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")  # (with Qwen2's split, the last one set)
    path = gguf_export.write(tmp_path / "qwen3", tmp_path / "q.gguf", "q8_0", "q")
    assert fields(path)["tokenizer.ggml.pre"] == "qwen2"


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_quantize_stage_gates_a_gguf_of_a_new_family(arch, tokenizer, make_recipe, tmp_path):
    """The quantize stage's gguf-q8_0 candidate on Gemma 2 (window 16 inside the gate's 64-token windows) and
    Phi-3: written, reloaded with the tokenizer files saved beside it (transformers' GGUF loader would rebuild
    a Gemma / Phi-3 tokenizer of its own from the file), scored against the input and chosen."""
    model = family_model(arch, tokenizer, **WRITABLE[arch])
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    path = make_recipe(tmp_path / arch, finetune={"enabled": False}, distill={"enabled": False},
                       evaluate={"enabled": False},
                       quantize={"candidates": [{"method": "gguf-q8_0"}], "max_ppl_increase": 5.0, "speed_tokens": 0})
    assert main(["run", str(path)]) == 0
    out = tmp_path / "runs" / "tiny" / "quantize"
    row = _record(out)["candidates"][0]
    assert row["status"] == "passed" and abs(row["ppl_increase_pct"]) < 1, row
    assert (out / "tiny-Q8_0.gguf").is_file() and fields(out / "tiny-Q8_0.gguf")["general.architecture"] == arch
    loaded, _ = formats.load_folder(out)
    assert type(loaded) is type(model)
