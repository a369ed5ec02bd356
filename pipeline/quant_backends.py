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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

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
    # NNCF's data-aware weight compression; nncf runs none of it for 8-bit weights
    "awq": ("openvino-int4",),
    "scale_estimation": ("openvino-int4",),
    "gptq": ("openvino-int4",),
    "lora_correction": ("openvino-int4",),
    "sensitivity_metric": ("openvino-int4",),
    "backup_precision": ("openvino-int4",),
    "calibration_samples": ("openvino-int4",),
    "calibration_tokens": ("openvino-int4",),
    "output_tensor_type": tuple(GGUF_BITS),
}
DATA_AWARE = ("awq", "scale_estimation", "gptq", "lora_correction")
# nncf.SensitivityMetric values; all but the first rank layers on calibration activations
SensitivityMetric = Literal["weight_quantization_error", "hessian_input_activation", "mean_activation_variance",
                            "max_activation_variance", "mean_activation_magnitude"]
CALIBRATION_SAMPLES = 128  # optimum-intel's default number of calibration sequences for causal LMs


@dataclass
class Candidate:
    method: Method  # the quantization method (the table above)
    name: str | None = None  # label in tables and `pipeline.json` (null = the method); lets one method run twice
    threshold: float | None = None  # `bnb-int8`: LLM.int8 outlier threshold (null = 6.0)
    double_quant: bool | None = None  # `bnb-nf4`/`bnb-fp4`: quantize the scales too (null = true)
    # `bnb-nf4`/`bnb-fp4`: matmul dtype, `float32` (null), `bfloat16` or `float16`
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    sym: bool | None = None  # `openvino-int8`/`openvino-int4`: symmetric weights, no zero points (null = false)
    # `openvino-int4`: weights sharing one scale; -1 = one scale per channel; null = 128, lowered per layer where it
    # does not divide the weight (a value you set is used as given and fails the candidate where it does not fit)
    group_size: int | None = None
    # `openvino-int4`: fraction of layers in 4-bit, the rest in `backup_precision`, chosen by `sensitivity_metric`
    # (null = 1.0)
    ratio: float | None = None
    # `openvino-int4`, data-aware (NNCF, below): activation-aware scaling of salient channels before rounding
    awq: bool | None = None
    scale_estimation: bool | None = None  # `openvino-int4`, data-aware: fit each group's scale to the layer's output
    gptq: bool | None = None  # `openvino-int4`, data-aware: round column by column, correcting the rest
    # `openvino-int4`, data-aware: a low-rank float correction of the rounding error (more accurate, slower to
    # generate with)
    lora_correction: bool | None = None
    # `openvino-int4` with `ratio` < 1: how layers are ranked for `backup_precision` (NNCF's `SensitivityMetric`;
    # all but `weight_quantization_error` rank on calibration activations)
    sensitivity_metric: SensitivityMetric | None = None
    # `openvino-int4`: the layers not in 4-bit: `int8_asym` (null), `int8_sym`, or `none` = float
    backup_precision: Literal["none", "int8_sym", "int8_asym"] | None = None
    # `openvino-int4`, data-aware: calibration blocks, drawn (seeded) from the recipe's training split, never from
    # the split the gate scores (null = 128)
    calibration_samples: int | None = None
    calibration_tokens: int | None = None  # `openvino-int4`, data-aware: tokens per block (null = `data.block_size`)
    # `gguf-*`: the output head's type, or the tied embedding's that serves as it (llama-quantize's
    # `--output-tensor-type`); null = the file's type for f16/q8_0, q8_0 for the 4/5-bit types
    output_tensor_type: Literal["f16", "q8_0"] | None = None

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
        if self.gptq and self.lora_correction:
            problems.append("gptq and lora_correction: nncf cannot apply both to one model; pick one")
        if self.sensitivity_metric is not None and (self.ratio is None or self.ratio == 1):
            problems.append("sensitivity_metric: only ranks layers for the backup precision when ratio < 1; "
                            "set ratio (e.g. 0.8) or drop it")
        for key in ("calibration_samples", "calibration_tokens"):
            value = getattr(self, key)
            if value is not None and value < (2 if key == "calibration_tokens" else 1):
                problems.append(f"{key}: {value} must be at least {2 if key == 'calibration_tokens' else 1}")
        if not problems and self.backend == "openvino" and unavailable(self, torch.device("cpu")) is None:
            try:  # the refusals optimum-intel itself knows about, at validation instead of mid-run
                openvino_config(self)
            except ValueError as err:
                problems.append(f"optimum-intel refuses these options: {err}")
        return problems

    @property
    def data_aware(self) -> bool:
        """Whether nncf needs calibration activations: an algorithm that uses them, an explicit calibration
        set, or layer ranking by an activation-based sensitivity metric."""
        return (any(getattr(self, key) for key in DATA_AWARE) or self.calibration_samples is not None
                or self.sensitivity_metric not in (None, "weight_quantization_error"))

    @property
    def num_samples(self) -> int:
        """Calibration sequences this candidate asks for."""
        return self.calibration_samples or CALIBRATION_SAMPLES

    def calibration_shape(self, block_size: int) -> tuple[int, int]:
        """(sequences, tokens each) of the calibration set this candidate asks for."""
        return (self.num_samples, self.calibration_tokens or block_size)

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


def openvino_config(cand: Candidate, statistics_path: Path | None = None):
    from optimum.intel import OVWeightQuantizationConfig

    options = {"bits": cand.bits, "sym": bool(cand.sym)}
    if cand.method == "openvino-int4":
        # The default group size is adjusted per layer where it does not divide the weight (SmolLM2's 576
        # channels, say), as optimum-intel's own int4 presets do; a group size the recipe sets is used as given.
        options.update(group_size=128 if cand.group_size is None else cand.group_size,
                       group_size_fallback="adjust" if cand.group_size is None else "error",
                       ratio=1.0 if cand.ratio is None else cand.ratio,
                       sensitivity_metric=cand.sensitivity_metric, backup_precision=cand.backup_precision,
                       scale_estimation=cand.scale_estimation, gptq=cand.gptq, lora_correction=cand.lora_correction)
        if cand.awq:
            options["quant_method"] = "awq"
        if cand.data_aware:
            # The calibration set itself goes to OVQuantizer.quantize; nncf keeps the activation statistics
            # under statistics_path, so candidates on the same calibration set collect them once.
            options.update(num_samples=cand.num_samples,
                           statistics_path=None if statistics_path is None else str(statistics_path))
    return OVWeightQuantizationConfig(**options)


@dataclass
class Calibration:
    """Calibration blocks for data-aware candidates and what is computed from them once per stage run: the
    full-precision OpenVINO export, the model inputs optimum-intel collects from it, nncf's statistics."""
    work: Path  # scratch folder of the stage run
    blocks: "Callable[[int, int], torch.Tensor]"  # (sequences, tokens) -> LongTensor, from the training split
    block_size: int
    _inputs: dict = field(default_factory=dict)

    def ir(self, source: Path, trust_remote_code: bool) -> Path:
        folder = self.work / "openvino-fp32"
        if not (folder / "openvino_model.xml").exists():
            _export(source, trust_remote_code, load_in_8bit=False).save_pretrained(folder)
        return folder

    def dataset(self, model, quantizer, config, shape: tuple[int, int]):
        if shape not in self._inputs:
            import datasets
            import nncf

            ids = self.blocks(*shape)
            rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
            collected = quantizer.dataset_builder.build_from_dataset(config, rows)["model"]
            model.clear_requests()  # collecting compiled the float model; it is recompiled after compression
            # Each sample is one prefill (generate with max_new_tokens=1), so the flag optimum-intel adds to
            # ask nncf to reset the KV state before it carries nothing: nncf resets a stateful model before
            # every inference anyway. Dropped because nncf's GPTQ feeds the samples to stateless subgraphs,
            # which refuse the flag ("Cannot reset state of a stateless model").
            from nncf.definitions import NNCF_DATASET_RESET_STATE_KEY

            samples = [{k: v for k, v in item.items() if k != NNCF_DATASET_RESET_STATE_KEY}
                       for item in collected.get_data()]
            self._inputs[shape] = {"model": nncf.Dataset(samples)}
        return self._inputs[shape]

    def statistics(self, shape: tuple[int, int]) -> Path:
        return self.work / f"nncf-statistics-{shape[0]}x{shape[1]}"


def quantize(cand: Candidate, source: Path, device: torch.device, trust_remote_code: bool = False,
             calibration: Calibration | None = None):
    """The full-precision model folder `source`, quantized in memory (not yet saved); for GGUF, the export
    to write on `save`."""
    if cand.backend == "gguf":
        return gguf_export(cand, source, trust_remote_code)
    if cand.backend == "bitsandbytes":
        return models.load_model(models.Source("folder", str(source)), trust_remote_code=trust_remote_code,
                                 quantization_config=bnb_config(cand), device_map=str(device))
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizer

    if cand.data_aware:
        if calibration is None:
            raise ValueError(f"{cand.label} is data-aware and needs calibration blocks")
        model = OVModelForCausalLM.from_pretrained(calibration.ir(source, trust_remote_code), compile=False)
        shape = cand.calibration_shape(calibration.block_size)
        config = openvino_config(cand, calibration.statistics(shape))
        quantizer = OVQuantizer.from_pretrained(model)
        quantizer.quantize(ov_config=OVConfig(quantization_config=config),
                           calibration_dataset=calibration.dataset(model, quantizer, config, shape))
        return model

    return _export(source, trust_remote_code, quantization_config=openvino_config(cand))


def _export(source: Path, trust_remote_code: bool, **options):
    """`source` exported to OpenVINO IR by optimum-intel (not compiled), with `options` for the export."""
    from optimum.intel import OVModelForCausalLM

    with warnings.catch_warnings():  # tracing the torch model warns about every data-dependent branch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return OVModelForCausalLM.from_pretrained(source, export=True, compile=False,
                                                  trust_remote_code=trust_remote_code, **options)


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
    return GGUFExport(Path(source), cand.method.removeprefix("gguf-"), name, trust_remote_code,
                      cand.output_tensor_type)


def describe_gguf(cand: Candidate) -> str:
    from pipeline.gguf_export import TYPES

    label = TYPES[cand.method.removeprefix("gguf-")][2]
    if cand.output_tensor_type:
        head = f"output head / tied embedding {cand.output_tensor_type.upper()}; "
    elif label in ("F16", "Q8_0"):
        head = ""
    else:
        head = "output head / tied embedding Q8_0, as llama.cpp keeps it at higher precision; "
    return f"GGUF {label} weights for llama.cpp/Ollama ({head}norms and biases F32)"


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
        used = [name for name, on in (("AWQ", cand.awq), ("scale estimation", cand.scale_estimation),
                                      ("GPTQ", cand.gptq), ("LoRA correction", cand.lora_correction)) if on]
        if ratio < 1:  # nncf's default ranking depends on whether it has calibration data
            default = "max_activation_variance" if cand.data_aware else "weight_quantization_error"
            text += f" ranked by {cand.sensitivity_metric or default}"
        if cand.data_aware:
            text += (f"; data-aware{': ' + ', '.join(used) if used else ''}, {cand.num_samples} calibration "
                     f"sequences of {cand.calibration_tokens or 'data.block_size'} tokens from the training split")
    return text + ")"


def grid(cand: Candidate) -> dict | None:
    """The integer grid a 4-bit candidate rounds the block weights to (what finetune.qat can train for);
    None for 8-bit and for bitsandbytes' NF4/FP4, which are float code books, not integer grids."""
    if cand.method == "openvino-int4":
        return {"bits": 4, "group_size": 128 if cand.group_size is None else cand.group_size,
                "symmetric": bool(cand.sym)}
    if cand.method in ("gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1"):  # llama.cpp blocks of 32 weights
        return {"bits": int(cand.method[6]), "group_size": 32, "symmetric": cand.method.endswith("_0")}
    return None


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

