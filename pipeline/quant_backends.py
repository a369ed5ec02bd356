"""Quantization methods the quantize stage can try, and how each one converts, saves and loads.

`bnb-*` (bitsandbytes) write a transformers folder whose config.json carries the
`quantization_config`, so `AutoModelForCausalLM.from_pretrained` reloads it. `openvino-*` export
through optimum-intel with NNCF weight compression and write an OpenVINO IR folder
(`openvino_model.xml/.bin`) that `OVModelForCausalLM.from_pretrained` reloads. `gguf-*` write a GGUF
folder (`<model>-Q8_0.gguf` and the tokenizer files) for llama.cpp, Ollama and LM Studio; it is scored
as the file itself, reloaded with transformers' `gguf_file=` (pipeline/gguf_export.py). All quantize
weights only: quantizing activations too (dynamic int8) wrecks models this small."""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import models

Method = Literal["bnb-int8", "bnb-nf4", "bnb-fp4", "openvino-int8", "openvino-int4",
                 "gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1"]
BITS = {"bnb-int8": 8, "bnb-nf4": 4, "bnb-fp4": 4, "openvino-int8": 8, "openvino-int4": 4}
# GGUF types as llama.cpp names them; bits of the main weight type (Q8_0 stores 8.5 bits a weight, with scales)
GGUF_BITS = {"gguf-f16": 16, "gguf-q8_0": 8, "gguf-q4_0": 4, "gguf-q4_1": 4, "gguf-q5_0": 5, "gguf-q5_1": 5}
BITS.update(GGUF_BITS)
# Which methods each option applies to; setting it on another method is a recipe error.
OPTIONS = {
    "threshold": ("bnb-int8",),
    "double_quant": ("bnb-nf4", "bnb-fp4"),
    "compute_dtype": ("bnb-nf4", "bnb-fp4"),
    "sym": ("openvino-int8", "openvino-int4"),
    "group_size": ("openvino-int4",),
    "ratio": ("openvino-int4",),
}


@dataclass
class Candidate:
    method: Method
    name: str | None = None  # label in tables and pipeline.json (default: the method); lets one method run twice
    threshold: float | None = None  # bnb-int8: LLM.int8 outlier threshold (default 6.0)
    double_quant: bool | None = None  # bnb-nf4/fp4: also quantize the quantization scales (default true)
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # bnb-nf4/fp4: matmul dtype (float32)
    sym: bool | None = None  # openvino: symmetric weights, no zero points (default false)
    group_size: int | None = None  # openvino-int4: weights sharing one scale; -1 = per channel (default 128, adjusted)
    ratio: float | None = None  # openvino-int4: fraction of layers in 4-bit, the rest 8-bit (default 1.0)

    def check(self) -> list[str]:
        problems = []
        for option, methods in OPTIONS.items():
            if getattr(self, option) is not None and self.method not in methods:
                problems.append(f"{option}: does not apply to {self.method}; it is an option of {', '.join(methods)}")
        if self.threshold is not None and self.threshold < 0:
            problems.append(f"threshold: {self.threshold} must be non-negative")
        if self.group_size is not None and (self.group_size == 0 or self.group_size < -1):
            problems.append(f"group_size: {self.group_size} must be positive, or -1 for one scale per channel")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            problems.append(f"ratio: {self.ratio} must be in (0, 1]")
        return problems

    @property
    def label(self) -> str:
        return self.name or self.method

    @property
    def backend(self) -> str:
        if self.method in GGUF_BITS:
            return "gguf"
        return "bitsandbytes" if self.method.startswith("bnb-") else "openvino"

    @property
    def bits(self) -> int:
        return BITS[self.method]


def unavailable(cand: Candidate, device: torch.device) -> str | None:
    """Why `cand` cannot run on this machine, or None if it can."""
    if cand.backend == "gguf":  # written in numpy, read back by transformers: any device
        return None if importlib.util.find_spec("gguf") else "needs the gguf package: pip install gguf"
    if cand.backend == "bitsandbytes":
        if device.type == "mps":
            return "bitsandbytes does not run on Apple MPS; use an openvino-* candidate, or run on CPU/CUDA"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "needs bitsandbytes: pip install bitsandbytes"
        return None
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        from optimum.intel import OVModelForCausalLM  # noqa: F401
    except ImportError:
        return f"needs optimum-intel with OpenVINO: {models.OPENVINO_INSTALL}"
    return None


def bnb_config(cand: Candidate):
    from transformers import BitsAndBytesConfig

    if cand.method == "bnb-int8":
        threshold = 6.0 if cand.threshold is None else cand.threshold
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cand.method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=True if cand.double_quant is None else cand.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cand.compute_dtype or "float32"),
    )


def openvino_config(cand: Candidate):
    from optimum.intel import OVWeightQuantizationConfig

    options = {"bits": cand.bits, "sym": bool(cand.sym)}
    if cand.method == "openvino-int4":
        # The default group size is adjusted per layer where it does not divide the weight (SmolLM2's 576
        # channels, say), as optimum-intel's own int4 presets do; a group size the recipe sets is used as given.
        options.update(group_size=128 if cand.group_size is None else cand.group_size,
                       group_size_fallback="adjust" if cand.group_size is None else "error",
                       ratio=1.0 if cand.ratio is None else cand.ratio)
    return OVWeightQuantizationConfig(**options)


def quantize(cand: Candidate, source: Path, device: torch.device, trust_remote_code: bool = False):
    """The full-precision model folder `source`, quantized in memory (not yet saved); for GGUF, the export
    to write on `save`."""
    if cand.backend == "gguf":
        return gguf_export(cand, source, trust_remote_code)
    if cand.backend == "bitsandbytes":
        return models.load_model(models.Source("folder", str(source)), trust_remote_code=trust_remote_code,
                                 quantization_config=bnb_config(cand), device_map=str(device))
    from optimum.intel import OVModelForCausalLM

    with warnings.catch_warnings():  # tracing the torch model warns about every data-dependent branch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return OVModelForCausalLM.from_pretrained(source, export=True, quantization_config=openvino_config(cand),
                                                  compile=False, trust_remote_code=trust_remote_code)


def save(model, folder: Path) -> None:
    """bitsandbytes: safetensors + config.json with quantization_config; OpenVINO: openvino_model.xml/.bin.
    Save before running the model: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the
    first forward pass (scales rounded to bf16) and saving unpacks them again, which is not exact."""
    if hasattr(model, "parameters"):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder)


def gguf_export(cand: Candidate, source: Path, trust_remote_code: bool = False):
    """The GGUF export of `source`; the file is named after the recipe that made the folder (or the folder)."""
    from pipeline.checkpoint import read_record
    from pipeline.gguf_export import GGUFExport

    name = (read_record(source) or {}).get("recipe") or Path(source).name
    return GGUFExport(Path(source), cand.method.removeprefix("gguf-"), name, trust_remote_code)


def describe_gguf(cand: Candidate) -> str:
    from pipeline.gguf_export import TYPES

    label = TYPES[cand.method.removeprefix("gguf-")][2]
    if label in ("F16", "Q8_0"):
        return f"GGUF {label} weights for llama.cpp/Ollama (norms and biases F32)"
    return (f"GGUF {label} weights for llama.cpp/Ollama (output head / tied embedding Q8_0, as llama.cpp keeps "
            "it at higher precision; norms and biases F32)")


def describe(cand: Candidate) -> str:
    if cand.backend == "gguf":
        return describe_gguf(cand)
    if cand.method == "bnb-int8":
        return f"bitsandbytes LLM.int8 weights (outlier threshold {bnb_config(cand).llm_int8_threshold})"
    if cand.backend == "bitsandbytes":
        q = bnb_config(cand)
        return (f"bitsandbytes 4-bit {q.bnb_4bit_quant_type.upper()} weights (double quant "
                f"{'on' if q.bnb_4bit_use_double_quant else 'off'}, compute {cand.compute_dtype or 'float32'})")
    text = f"OpenVINO int{cand.bits} weights via optimum-intel/NNCF ({'symmetric' if cand.sym else 'asymmetric'}"
    if cand.method == "openvino-int4":
        ratio = 1.0 if cand.ratio is None else cand.ratio
        group = "128 (adjusted per layer)" if cand.group_size is None else cand.group_size
        text += f", group size {group}, {ratio:.0%} of layers in 4-bit"
    return text + ")"


def versions(cand: Candidate) -> dict:
    """Versions of the packages that wrote a candidate's folder (pipeline.json lists the core ones)."""
    import importlib.metadata as md

    packages = ["bitsandbytes"] if cand.backend == "bitsandbytes" else ["optimum-intel", "optimum", "openvino", "nncf"]
    if cand.backend == "gguf":
        packages = ["gguf"]
    out = {}
    for package in packages:
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def tags(cand: Candidate) -> list[str]:
    return [cand.backend, f"{cand.bits}-bit", "quantized"]

