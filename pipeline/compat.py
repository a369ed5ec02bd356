"""Workarounds for library releases the pipeline uses where they are wrong (mostly with newer releases of the
libraries under them): one place, each naming the versions that need it (transformers 5.14-5.25 of the 5.5-5.25
pyproject.toml allows, see docs/reference.md, stage quantize; nncf 3.4); tests/test_compat.py fails when one breaks
or is no longer needed.

optimum-intel's vision-language module (`optimum.intel.openvino.modeling_visual_language`). optimum-intel 2.2.0
(the newest release; its main branch of 2026-08 too) imports it eagerly, from `optimum.intel.openvino` and from
its quantization module, and the module binds transformers' vision-language internals when it is imported.
transformers 5.17 renamed or removed two of them (qwen2_vl's `VisionRotaryEmbedding`, now
`Qwen2VLVisionRotaryEmbedding` with another signature, and `Qwen3VLVisionModel.rot_pos_emb`), so from 5.17 on
`from optimum.intel import OVModelForCausalLM` fails although exporting, compressing and running a causal LM never
uses that module. `install()` puts an import hook in front of that one module: the module is imported as
usual, and only if importing it fails, it is replaced by a stand-in whose classes refuse to be used, naming the
original error (so optimum-intel's vision-language models stay unavailable, as they were).

optimum-intel's `OVModelForCausalLM.generate`. From transformers 5.14 on, `GenerationMixin.generate` asks the model
for `get_experts_implementation()` (to switch mixture-of-experts kernels for decoding), a method of
`PreTrainedModel`; `OVModelForCausalLM` is a `GenerationMixin` but no `PreTrainedModel`, so every `generate` fails
with AttributeError. The same hook, once optimum-intel's decoder module is imported, gives the class that method,
answering that it has no experts kernels to switch (`{"": None}`: OpenVINO runs the compiled graph), so
generate goes on as before. Only where the class lacks it.

optimum-intel's OpenVINO export of Gemma. optimum-intel 2.2.0 caps the export of `gemma`, `gemma2` and `gemma3_text`
at transformers 5.0 (its export config's MAX_TRANSFORMERS_VERSION), so with this project's transformers the
export refuses. Measured (tests/test_compat.py, tiny configs with a sliding window shorter than the text): all
three export with transformers 5.5.4 and 5.23.0 and their OpenVINO logits match torch's in f32 to 1e-5, greedy
generation past the window included. The same hook, once optimum-intel's export configs are imported, raises each
cap to the installed transformers where it is below the release the measurement covers (EXPORT_MEASURED,
exclusive), and leaves it elsewhere, so `validate` still refuses the rest. For Gemma 2 one more mend: optimum-intel
forces SDPA attention on it (FORCE_ATTN_MODEL_CLASSES), which transformers refuses for Gemma 2 in 5.23 (its
`_supports_sdpa` is False; 5.5.4 accepts it); where the installed transformers refuses it, the hook drops that
one entry when optimum-intel's export module is imported (`unforced`), so the model loads with transformers' own
choice (eager), and exports and matches torch as the others.

nncf's LoRA correction with the embedding in 4-bit. With `all_layers` (the input embedding compressed to 4-bit like
the linear layers) and `lora_correction`, nncf 3.4 fails with a KeyError: it asks every 4-bit weight for
adapters, and the embedding's Gather node has no activation statistics (its input is token ids). The hook, once
nncf's LoRA correction module is imported, makes a weight without statistics get no adapters (the embedding is
compressed to 4-bit as without LoRA correction, every linear layer gets its adapters), where nncf itself would
fail on it (`lora_skipped` counts them); measured with nncf 3.4.0 (tests/test_compat.py: the combination exports
and its adapters are there; the test fails when nncf no longer needs it).

optimum-intel's export of the KV cache. From transformers 5.24 the models' `past_key_values` argument is named
`cache` (the old name is a deprecated alias) and the cache layers' `update` takes other arguments; optimum-intel
2.2.0's exporter checks its dummy inputs against the model's signature, drops the `past_key_values` input its
patched forward no longer finds there, and replaces `DynamicLayer.update` with a function of the old signature,
so a model exported with its KV cache fails to trace. Exported without it (`use_cache=False`: inputs input_ids,
attention_mask, position_ids; output logits) the same models trace, and their OpenVINO logits and greedy
generation equal torch's (tests/test_compat.py). `kv_cache_export()` says which one the installed transformers
allows; pipeline/formats/openvino.py exports without the cache from 5.24 on (KV_CACHE_BELOW), so perplexity and
prefill are as before and generation recomputes the whole prefix for each new token (slower; measured in
bench/results/quantize-transformers.json).

optimum-intel, nncf and transformers are otherwise left as they are."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import traceback

VISUAL_LANGUAGE = "optimum.intel.openvino.modeling_visual_language"
DECODER = "optimum.intel.openvino.modeling_decoder"
# The first transformers releases that need each workaround with optimum-intel 2.2.0
NEEDED_FROM = {"visual_language": "5.17", "generate": "5.14"}
EXPORT_CONFIGS = "optimum.exporters.openvino.model_configs"
# export config class: the first transformers release its OpenVINO export was not measured to work with
# (Gemma 1 measured with 5.25.0 too, exported without KV cache; Gemma 2 and 3's export patchers look up a
# `past_key_values` argument that 5.24 renamed, with or without the cache)
EXPORT_MEASURED = {"GemmaOpenVINOConfig": "5.26", "Gemma2OpenVINOConfig": "5.24", "Gemma3TextOpenVINOConfig": "5.24"}
EXPORT_MAIN = "optimum.exporters.openvino.__main__"
# the first transformers release whose KV cache optimum-intel 2.2.0 cannot trace
KV_CACHE_BELOW = "5.24"
LORA = "nncf.quantization.algorithms.weight_compression.lora_correction"
# weights the hook kept from nncf's LoRA correction because nncf collected no statistics for them (the 4-bit
# embedding): their node names
lora_skipped: list[str] = []
# model type -> the attention implementation optimum-intel forces, where the hook dropped it (transformers refuses it)
unforced: dict[str, str] = {}
# export config class -> the cap it had and the one it has now, where the hook raised it
lifted: dict[str, tuple[str, str]] = {}
# Why the stand-in replaced the vision-language module (None: it imported, or has not been imported yet)
stood_in: str | None = None
# Whether OVModelForCausalLM was given get_experts_implementation
gave_experts: bool = False


class _Unavailable:
    """A stand-in for one of optimum-intel's vision-language classes: isinstance checks against it are False,
    using it raises ImportError with the reason."""
    reason = ""

    def __init__(self, *args, **kwargs):
        raise ImportError(self.reason)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ImportError(cls.reason)


def _stand_in(module, err: BaseException) -> None:
    global stood_in
    where = traceback.extract_tb(err.__traceback__)[-1]
    stood_in = (f"optimum-intel's vision-language models are unavailable: {VISUAL_LANGUAGE} does not import with "
                f"this transformers ({type(err).__name__}: {err}, {where.filename}:{where.lineno}); "
                "see pipeline/compat.py")
    for name in [n for n in vars(module) if not n.startswith("__")]:  # what it defined before it failed
        delattr(module, name)
    module.MODEL_TYPE_TO_CLS_MAPPING = {}  # the vision-language model types; none here

    def __getattr__(name: str):
        if not name.startswith("OV"):
            raise AttributeError(f"module {VISUAL_LANGUAGE!r} (a stand-in: {stood_in}) has no attribute {name!r}")
        cls = type(name, (_Unavailable,), {"reason": stood_in, "__module__": VISUAL_LANGUAGE})
        setattr(module, name, cls)
        return cls

    module.__getattr__ = __getattr__


def _no_experts(self) -> dict:
    """OVModelForCausalLM.get_experts_implementation (pipeline/compat.py): no torch experts kernels to switch."""
    return {"": None}


def _give_experts(module) -> None:
    global gave_experts
    from transformers import PreTrainedModel

    cls = module.OVModelForCausalLM
    if hasattr(PreTrainedModel, "get_experts_implementation") and not hasattr(cls, "get_experts_implementation"):
        cls.get_experts_implementation = _no_experts
        gave_experts = True


def _lift_caps(module) -> None:
    """Raise the measured export configs' transformers caps to the installed release, where it is below the
    release the measurement covers; each class gets its own attribute (Gemma 2 and 3 inherit Gemma's)."""
    import importlib.metadata as md

    from packaging.version import Version

    have = Version(md.version("transformers"))
    caps = {name: getattr(getattr(module, name, None), "MAX_TRANSFORMERS_VERSION", None) for name in EXPORT_MEASURED}
    for name, below in EXPORT_MEASURED.items():
        cls, cap = getattr(module, name, None), caps[name]  # (read before any is raised: they inherit)
        if cls is None or cap is None:
            continue
        if Version(str(cap)) < have < Version(below):
            cls.MAX_TRANSFORMERS_VERSION = str(have)
            lifted[name] = (str(cap), str(have))
        else:
            cls.MAX_TRANSFORMERS_VERSION = cap  # its own, not the parent's raised one


def _unforce(module) -> None:
    """Drop optimum-intel's forced attention implementation for Gemma 2 where transformers refuses it."""
    forced = getattr(module, "FORCE_ATTN_MODEL_CLASSES", {})
    if forced.get("gemma2") == "sdpa":
        from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

        if not getattr(Gemma2PreTrainedModel, "_supports_sdpa", True):
            unforced["gemma2"] = forced.pop("gemma2")


def kv_cache_export() -> bool:
    """Whether optimum-intel can export models with their KV cache under the installed transformers."""
    import importlib.metadata as md

    from packaging.version import Version

    return Version(md.version("transformers")) < Version(KV_CACHE_BELOW)


def _skip_statless(module) -> None:
    """Give LoRA adapters only to the weights nncf has activation statistics for (pipeline/compat.py)."""
    cls = module.LoraCorrectionAlgorithm
    if getattr(cls.is_applicable, "_pipeline_mend", False):
        return
    original = cls.is_applicable

    def is_applicable(self, wc_params):
        if not original(self, wc_params):
            return False
        name = wc_params.node_with_weight.node_name
        if name in self._statistics:
            return True
        lora_skipped.append(name)
        return False

    is_applicable._pipeline_mend = True
    is_applicable.original = original
    cls.is_applicable = is_applicable


# module -> the mend applied once it is imported
MENDS = {DECODER: _give_experts, EXPORT_CONFIGS: _lift_caps, EXPORT_MAIN: _unforce, LORA: _skip_statless}


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        if module.__name__ in MENDS:
            self.real.exec_module(module)
            MENDS[module.__name__](module)
            return
        try:
            self.real.exec_module(module)
        except (ImportError, AttributeError) as err:
            _stand_in(module, err)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != VISUAL_LANGUAGE and name not in MENDS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the hook in front of the import system (once); a no-op for imports done before."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
        if LORA in sys.modules:  # nncf imported first (a script that uses it directly): mend it now
            _skip_statless(sys.modules[LORA])
