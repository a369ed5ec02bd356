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

optimum-intel's export of the KV cache. From transformers 5.24 the models' `past_key_values` argument and output
field are named `cache` (the old names are deprecated aliases) and the cache layers' `update` takes other
arguments; optimum-intel 2.2.0's exporter looks for `past_key_values` in the model's signature (to check and
order its dummy inputs, and to turn the legacy tuples it traces with into a cache) and in its outputs (to name
the `present.*` outputs), and replaces `DynamicLayer.update` during tracing with a function of the old
signature, so no model exports with its KV cache. The same hook, once optimum-intel's patching module is
imported, gives every export patcher whose model names the argument `cache` a forward that takes and returns it
under the old name (`cache_renamed` lists those model classes), and lets optimum-intel's replacement `update`
accept the new arguments (it never used the old ones). And `generate` hands the cache back to the model as
`cache`, which optimum-intel's `prepare_inputs_for_generation` does not read, so each new token would reset the
stateful model and recompute the prefix: once its decoder module is imported, the hook passes it on as
`past_key_values` (`cache_handed`). Measured with 5.25.0 (tests/test_compat.py): Llama,
Qwen3, Mistral, Phi-3, GPT-2, GPT-NeoX and Gemma 1-3 export stateful models whose f32 logits match torch's to
1e-5 and whose greedy generation, past a sliding window included, equals torch's. Releases before 5.24 name it
`past_key_values` and are left alone.

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
# (all three measured with 5.25.0 too, with their KV cache under the old name: `_old_cache_name`)
EXPORT_MEASURED = {"GemmaOpenVINOConfig": "5.26", "Gemma2OpenVINOConfig": "5.26", "Gemma3TextOpenVINOConfig": "5.26"}
EXPORT_MAIN = "optimum.exporters.openvino.__main__"
PATCHING = "optimum.exporters.openvino.patching_utils"
# model classes whose forward the hook showed optimum-intel's exporter under the old cache name
cache_renamed: list[str] = []
# OpenVINO model classes the hook handed generate's `cache` to as `past_key_values` (a set: it happens per token)
cache_handed: set[str] = set()
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


def _take_cache(module) -> None:
    """optimum-intel's decoders' `prepare_inputs_for_generation` given the cache under the name transformers >= 5.24
    hands it over with (`cache`), where they take `past_key_values`: without it, every generated token resets the
    OpenVINO model's state and recomputes the whole prefix (right tokens, prefill cost per token)."""
    import inspect

    for cls in vars(module).values():
        if not (isinstance(cls, type) and issubclass(cls, module.OVModelForCausalLM)):
            continue
        own = vars(cls).get("prepare_inputs_for_generation")
        if own is None or getattr(own, "_pipeline_mend", False) or \
                "past_key_values" not in inspect.signature(own).parameters:
            continue

        def prepare_inputs_for_generation(self, input_ids, *args, _own=own, **kwargs):
            if "cache" in kwargs and kwargs.get("past_key_values") is None and not args:
                kwargs["past_key_values"] = kwargs.pop("cache")
                cache_handed.add(type(self).__name__)
            return _own(self, input_ids, *args, **kwargs)

        prepare_inputs_for_generation._pipeline_mend = True
        prepare_inputs_for_generation.__wrapped__ = own
        cls.prepare_inputs_for_generation = prepare_inputs_for_generation


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


class _Outputs(dict):
    """A model's outputs as optimum-intel's export patchers read them: by key (`.items()`) and by attribute."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _old_cache_name(forward):
    """`forward` with its `cache` argument and output named `past_key_values`, as optimum-intel expects."""
    import inspect

    signature = inspect.signature(forward)
    params = [p.replace(name="past_key_values") if p.name == "cache" else p for p in signature.parameters.values()]

    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        out = forward(*args, **kwargs)
        if isinstance(out, dict) and "cache" in out:  # ModelOutput: an ordered dict of the fields that are set
            out = _Outputs(("past_key_values" if k == "cache" else k, v) for k, v in out.items())
        return out

    renamed.__signature__ = signature.replace(parameters=params)
    renamed.__name__ = getattr(forward, "__name__", "forward")
    return renamed


def _old_cache_names(module) -> None:
    """optimum-intel's export patchers shown models (transformers >= 5.24) that name their cache `cache`."""
    import inspect

    cls = module.ModelPatcher
    if getattr(cls.__init__, "_pipeline_mend", False):
        return
    init, update = cls.__init__, module.patched_dynamic_layer_update

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        params = inspect.signature(self.orig_forward).parameters
        if "cache" in params and "past_key_values" not in params:
            self.orig_forward = _old_cache_name(self.orig_forward)  # subclasses' patched forwards wrap this one
            self.patched_forward.__signature__ = self.orig_forward.__signature__  # the base's wrapped the old one
            cache_renamed.append(type(self._model).__name__)

    def patched_dynamic_layer_update(self, key_states, value_states, *args, **kwargs):
        return update(self, key_states, value_states)  # optimum-intel's ignores everything after the states

    __init__._pipeline_mend = True
    __init__.__wrapped__ = init
    cls.__init__ = __init__
    module.patched_dynamic_layer_update = patched_dynamic_layer_update


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


# module -> the mends applied once it is imported, in order
MENDS = {DECODER: (_give_experts, _take_cache), EXPORT_CONFIGS: (_lift_caps,), EXPORT_MAIN: (_unforce,),
         LORA: (_skip_statless,), PATCHING: (_old_cache_names,)}


def _mend(module) -> None:
    for mend in MENDS[module.__name__]:
        mend(module)


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        if module.__name__ in MENDS:
            self.real.exec_module(module)
            _mend(module)
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
        for name in (LORA, PATCHING):  # imported first (a script that uses it directly): mend it now
            if name in sys.modules:
                _mend(sys.modules[name])
