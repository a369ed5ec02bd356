"""pipeline/compat.py's workarounds: each still needed where it says, and still working."""
import importlib.metadata as md
import subprocess
import sys

import pytest
from packaging.version import Version

from pipeline import compat, formats  # noqa: F401 -- formats.openvino installs the hook

TRANSFORMERS = Version(md.version("transformers"))


def plain_import_error() -> str:
    """What importing optimum.intel.openvino without the hook says ('' if it imports), in a fresh process."""
    code = ("import traceback\ntry:\n    import optimum.intel.openvino\nexcept Exception as err:\n"
            "    print(type(err).__name__, traceback.extract_tb(err.__traceback__)[-1].filename)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_optimum_intel_imports_through_the_hook_and_the_hook_is_needed_only_where_it_says():
    pytest.importorskip("optimum.intel")
    error = plain_import_error()
    from optimum.intel import OVModelForCausalLM, OVQuantizer, OVWeightQuantizationConfig  # noqa: F401

    if TRANSFORMERS < Version(compat.NEEDED_FROM["visual_language"]):
        assert not error and compat.stood_in is None, error
        return
    if not error:
        pytest.fail(f"optimum-intel {md.version('optimum-intel')} imports with transformers {TRANSFORMERS} without "
                    "pipeline/compat.py's stand-in for its vision-language module: remove the workaround "
                    "(compat.py, its install() in formats/openvino.py, this test, the note in docs/reference.md)")
    # it fails in the one module the hook covers, and only there; everything else is optimum-intel's own
    assert error.endswith("modeling_visual_language.py"), error
    assert compat.stood_in and "modeling_visual_language" in compat.stood_in
    from optimum.intel import OVModelForVisualCausalLM

    with pytest.raises(ImportError, match="vision-language models are unavailable"):
        OVModelForVisualCausalLM.from_pretrained("any")
    assert not isinstance(object(), OVModelForVisualCausalLM)


def test_the_stand_in_keeps_what_the_module_defined_before_it_failed_out(monkeypatch):
    import types

    module = types.ModuleType(compat.VISUAL_LANGUAGE)
    module.OVModelForVisualCausalLM = object  # a real class, defined before the line that failed
    monkeypatch.setattr(compat, "stood_in", None)
    try:
        raise AttributeError("type object 'Qwen3VLVisionModel' has no attribute 'rot_pos_emb'")
    except AttributeError as err:
        compat._stand_in(module, err)
    assert module.OVModelForVisualCausalLM is not object and issubclass(module.OVModelForVisualCausalLM,
                                                                        compat._Unavailable)
    assert module.MODEL_TYPE_TO_CLS_MAPPING == {}
    with pytest.raises(ImportError, match="rot_pos_emb"):
        module.OVVisionEmbedding()
    with pytest.raises(AttributeError):
        module.something_else  # noqa: B018
    assert sum(isinstance(f, compat._Finder) for f in sys.meta_path) == 1
    compat.install()
    assert sum(isinstance(f, compat._Finder) for f in sys.meta_path) == 1


def test_openvino_generate_works_and_get_experts_implementation_is_given_only_where_needed(tiny_models, tokenizer):
    """transformers >= 5.14's generate asks the model for get_experts_implementation, which OVModelForCausalLM
    (optimum-intel 2.2.0) lacks: the hook gives it one; the OpenVINO model then generates what torch does."""
    pytest.importorskip("optimum.intel")
    import torch
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

    own = "get_experts_implementation" in vars(OVModelForCausalLM) and OVModelForCausalLM.get_experts_implementation \
        is not compat._no_experts
    needed = hasattr(PreTrainedModel, "get_experts_implementation") and not own
    assert compat.gave_experts == needed
    if TRANSFORMERS >= Version(compat.NEEDED_FROM["generate"]) and not needed:
        pytest.fail(f"OVModelForCausalLM (optimum-intel {md.version('optimum-intel')}) has its own "
                    "get_experts_implementation: remove that workaround from pipeline/compat.py")
    assert not hasattr(GenerationMixin, "get_experts_implementation")  # else the class would inherit it
    folder = tiny_models["llama"]
    ov = formats.openvino._export(folder, False, load_in_8bit=False)  # with its KV cache
    ov.compile()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over").input_ids])
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ov.generate(ids, **kwargs), model.generate(ids, **kwargs))


def _generate_as_card_says(folder, tokenizer):
    """What the model card's snippet loads from `folder`, and its greedy tokens from a short prompt."""
    import torch

    snippet = formats.openvino.usage(folder, str(folder))
    scope = {}
    exec(snippet, scope)  # what the model card tells a user to run
    ids = torch.tensor([tokenizer("The quick brown fox jumps over").input_ids])
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.eos_token_id)
    return snippet, scope["model"].generate(ids, **kwargs), (ids, kwargs)


def _tokens_fed(model, ids, kwargs) -> list[int]:
    """How many tokens each forward call of `model` gets while it generates from `ids`."""
    import functools

    fed, forward = [], model.forward

    @functools.wraps(forward)  # generate checks its arguments against the forward's signature
    def counting(*args, **kw):
        fed.append((kw.get("input_ids") if "input_ids" in kw else args[0]).shape[1])
        return forward(*args, **kw)

    model.forward = counting
    try:
        model.generate(ids, **kwargs)
    finally:
        del model.forward
    return fed


def test_openvino_exports_the_kv_cache_on_every_release_and_the_card_loads_either_kind(tiny_models, tokenizer,
                                                                                     tmp_path):
    """From transformers 5.24 models name their cache `cache`; the hook shows optimum-intel 2.2.0's exporter the
    old name, so the IR is stateful (generation reuses the cache) and generates what torch does. An IR exported
    without the cache (a user's own) loads too, as the card's snippet says."""
    pytest.importorskip("optimum.intel")
    import torch
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoModelForCausalLM

    folder = tiny_models["llama"]
    want = None
    compat.cache_handed.clear()
    for cached in (False, True):  # the stateful one last: the mends are checked on it below
        out = tmp_path / f"ov-{cached}"
        compat.cache_renamed.clear()
        formats.openvino._export(folder, False, load_in_8bit=False, use_cache=cached).save_pretrained(out)
        tokenizer.save_pretrained(out)
        assert formats.openvino.kv_cache(out) == cached
        snippet, got, (ids, kwargs) = _generate_as_card_says(out, tokenizer)
        assert ("use_cache=False" in snippet) != cached
        if want is None:
            want = AutoModelForCausalLM.from_pretrained(folder).eval().generate(ids, **kwargs)
        assert torch.equal(got, want)
        model = OVModelForCausalLM.from_pretrained(out, use_cache=cached)
        assert model.stateful == cached
        # with its cache each step feeds one new token (without it, the whole sequence so far)
        assert _tokens_fed(model, ids, kwargs) == ([ids.shape[1]] + [1] * 7 if cached else
                                                   [ids.shape[1] + i for i in range(8)])
    renames = "cache" in __import__("inspect").signature(AutoModelForCausalLM.from_pretrained(folder).forward).parameters
    assert renames == (TRANSFORMERS >= Version("5.24"))
    assert bool(compat.cache_renamed) == renames

    assert bool(compat.cache_handed) == renames  # generate handed the cache over under its new name

    # without the mends generate recomputes the prefix for every token, and the exporter cannot trace the cache;
    # when optimum-intel does either by itself, its mend goes
    import optimum.intel.openvino.modeling_decoder as decoder
    import optimum.exporters.openvino.patching_utils as patching

    taking = decoder.OVModelForCausalLM.prepare_inputs_for_generation
    decoder.OVModelForCausalLM.prepare_inputs_for_generation = taking.__wrapped__
    try:
        fed = _tokens_fed(model, ids, kwargs)
    finally:
        decoder.OVModelForCausalLM.prepare_inputs_for_generation = taking
    assert (fed == [ids.shape[1] + i for i in range(8)]) == renames, fed

    mended = patching.ModelPatcher.__init__
    patching.ModelPatcher.__init__ = mended.__wrapped__
    try:
        OVModelForCausalLM.from_pretrained(folder, export=True, compile=False, load_in_8bit=False)
    except (RuntimeError, ValueError, TypeError) as err:
        assert renames, f"the export fails without the mend on {TRANSFORMERS}, which names it past_key_values: {err}"
    else:
        assert not renames, (f"optimum-intel {md.version('optimum-intel')} exports the KV cache with transformers "
                             f"{TRANSFORMERS} by itself: remove pipeline/compat.py's _old_cache_names")
    finally:
        patching.ModelPatcher.__init__ = mended


@pytest.mark.parametrize("arch,config_class", [("gemma", "GemmaOpenVINOConfig"), ("gemma2", "Gemma2OpenVINOConfig"),
                                               ("gemma3", "Gemma3TextOpenVINOConfig")])
def test_gemma_openvino_export_is_lifted_where_measured_and_matches_torch(arch, config_class, tokenizer, tmp_path):
    """optimum-intel 2.2.0 caps the Gemma exports at transformers 5.0; the hook raises a cap only below the release
    its measurement covers, and there the exported model computes what torch does (f32: this CPU may run bf16 by
    default), greedy generation past the 16-token sliding window included. Above it, validate refuses as before."""
    pytest.importorskip("optimum.intel")
    import optimum.exporters.openvino.model_configs as configs
    import torch
    from transformers import AutoModelForCausalLM

    import tiny

    folder = tiny.save_tiny(tmp_path / arch, arch, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cap = getattr(configs, config_class).MAX_TRANSFORMERS_VERSION
    if TRANSFORMERS >= Version(compat.EXPORT_MEASURED[config_class]):
        assert config_class not in compat.lifted and Version(cap) < TRANSFORMERS
        assert "pip install 'transformers<" in formats.openvino.unsupported(model.config)
        return
    assert formats.openvino.unsupported(model.config) is None
    if compat.lifted.get(config_class) is None:  # a later optimum-intel allows this transformers itself
        assert Version(cap) >= TRANSFORMERS
        pytest.fail(f"optimum-intel {md.version('optimum-intel')} exports {arch} with transformers {TRANSFORMERS}: "
                    "drop it from compat.EXPORT_MEASURED")
    if arch == "gemma2":  # optimum-intel forces SDPA on Gemma 2: dropped exactly where transformers refuses it
        import optimum.exporters.openvino.__main__ as export_main
        from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

        refuses = not Gemma2PreTrainedModel._supports_sdpa
        assert ("gemma2" in compat.unforced) == refuses
        assert ("gemma2" in export_main.FORCE_ATTN_MODEL_CLASSES) == (not refuses)
    ov = formats.openvino._export(folder, False)
    ov.ov_config = {"INFERENCE_PRECISION_HINT": "f32"}
    ov.compile()
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        want = model(ids).logits
    got = torch.as_tensor(ov(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    kwargs = dict(max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids[:, :8]),
                  pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ov.generate(ids[:, :8], **kwargs), model.generate(ids[:, :8], **kwargs))


def _quantize_all_layers_with_lora(source, work):
    """OpenVINO int4 of `source` with the embedding in 4-bit (all_layers) and LoRA correction; the IR's
    integer constants {name: type}."""
    import openvino as ov
    import torch
    from transformers import AutoTokenizer

    from pipeline import quant_backends as qb

    ids = torch.randint(3, 500, (16, 64), generator=torch.Generator().manual_seed(0))
    cand = qb.Candidate("openvino-int4", group_size=32, all_layers=True, lora_correction=True, calibration_samples=4)
    assert cand.check() == []  # no longer refused at validate
    qb.save(qb.quantize(cand, source, torch.device("cpu"), calibration=qb.Calibration(work, lambda n, t: ids[:n, :t],
                                                                                     64)), work / "out")
    AutoTokenizer.from_pretrained(source).save_pretrained(work / "out")  # as the quantize stage does
    model = ov.Core().read_model(str(work / "out" / "openvino_model.xml"))
    return {op.get_friendly_name(): op.get_output_element_type(0).get_type_name() for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_integral()}


def test_lora_correction_with_the_embedding_in_4_bit_exports_and_the_mend_is_needed(tiny_models, tmp_path):
    pytest.importorskip("nncf")
    from nncf.quantization.algorithms.weight_compression import lora_correction

    from pipeline import formats

    compat.lora_skipped.clear()
    constants = _quantize_all_layers_with_lora(tiny_models["llama"], tmp_path / "mended")
    # the embedding in 4-bit without adapters; every linear layer of the 2 decoder layers with its int8 pair
    embedding = [n for n in constants if "embed_tokens.weight" in n and not n.endswith("zero_point")]
    assert embedding and all(constants[n] in ("u4", "i4") for n in embedding), constants
    assert compat.lora_skipped and all("embed_tokens" in n for n in compat.lora_skipped), compat.lora_skipped
    adapters = [n for n in constants if n.endswith(("MatMul_lora_A", "MatMul_lora_B"))]
    linear = [n for n in constants if n.endswith("_proj.weight")]
    assert len(adapters) == 2 * len(linear) > 0 and not any("embed" in n for n in adapters), adapters
    reloaded, tokenizer = formats.load_folder(tmp_path / "mended" / "out")
    assert reloaded(**tokenizer("The interpreter reads", return_tensors="pt")).logits.isfinite().all()

    # without the mend nncf itself fails on the embedding; when it no longer does, the mend goes
    cls = lora_correction.LoraCorrectionAlgorithm
    mended = cls.is_applicable
    cls.is_applicable = mended.original
    try:
        _quantize_all_layers_with_lora(tiny_models["llama"], tmp_path / "plain")
    except KeyError as err:
        assert "embed_tokens" in str(err)
    else:
        pytest.fail(f"nncf {md.version('nncf')} applies LoRA correction with a 4-bit embedding by itself: remove "
                    "pipeline/compat.py's _skip_statless (and its note in docs/reference.md)")
    finally:
        cls.is_applicable = mended
