"""The quantize stage's candidates: their schema (`Candidate`, one recipe entry of `quantize.candidates`) and
the calls the stage makes for each, answered by the candidate's output format (pipeline/formats/):
`bnb-*` write a transformers folder with bitsandbytes weights, `openvino-*` an OpenVINO IR folder compressed
by NNCF, `gguf-*` a GGUF folder for llama.cpp. All quantize weights only: quantizing activations too
(dynamic int8) wrecks models this small."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from pipeline import formats
from pipeline.records import package_versions

# Every format's methods, in the order of the format table
Method = Literal[tuple(m for f in formats.FORMATS for m in f.METHODS)]
BITS = {m: bits for f in formats.FORMATS for m, bits in f.METHODS.items()}
# Which methods each option applies to; setting it on another method is a recipe error.
OPTIONS = {option: methods for f in formats.FORMATS for option, methods in f.OPTIONS.items()}
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
    # `openvino-int4`: the embedding and the output head in 4-bit too (NNCF's `all_layers`; null = false: they stay
    # in int8, which is a third of a small model with a large vocabulary, e.g. SmolLM2-135M's tied 49152 x 576)
    all_layers: bool | None = None
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
        if not problems:  # what the format's library itself refuses, at validation instead of mid-run
            problems += self.format.check(self)
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
    def format(self):
        """The module of pipeline/formats/ that writes this candidate's folder."""
        return formats.BY_METHOD[self.method]

    @property
    def backend(self) -> str:
        return self.format.BACKEND

    @property
    def bits(self) -> int:
        return BITS[self.method]


@dataclass
class Calibration:
    """Calibration blocks for data-aware candidates, and a cache for what a format computes from them once per
    stage run (OpenVINO: the float export, the inputs optimum-intel collects, nncf's statistics)."""
    work: Path  # scratch folder of the stage run
    blocks: "Callable[[int, int], torch.Tensor]"  # (sequences, tokens) -> LongTensor, from the training split
    block_size: int
    cache: dict = field(default_factory=dict)


@dataclass
class Job:
    """What a format needs to convert the quantize stage's input: given by the stage, never read from records."""
    source: Path  # the full-precision model folder
    device: torch.device
    trust_remote_code: bool = False
    calibration: Calibration | None = None
    name: str | None = None  # the model's name in files that carry one (GGUF); default: the folder's name
    origin: str | None = None  # the source its lineage was loaded from (records.origin), e.g. a .gguf file

    def __post_init__(self):
        self.source = Path(self.source)
        self.name = self.name or self.source.name


def unavailable(cand: Candidate, device: torch.device) -> str | None:
    """Why `cand` cannot run on this machine, or None if it can."""
    return cand.format.unavailable(cand, device)


def quantize(cand: Candidate, source: Path, device: torch.device, trust_remote_code: bool = False,
             calibration: Calibration | None = None, name: str | None = None, origin: str | None = None):
    """The full-precision model folder `source`, quantized in memory (not yet saved); for GGUF, the export
    to write on `save`."""
    return cand.format.convert(cand, Job(source, device, trust_remote_code, calibration, name, origin))


def save(model, folder: Path, cand: Candidate | None = None, tokenizer=None) -> None:
    """Write what `quantize` returned, and `tokenizer`, as the candidate's format does (a torch model: as a
    transformers folder)."""
    fmt = cand.format if cand is not None else formats.transformers if hasattr(model, "parameters") else None
    if fmt is None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    else:
        fmt.save(model, folder, tokenizer)


def describe(cand: Candidate) -> str:
    return cand.format.describe(cand)


def grid(cand: Candidate) -> dict | None:
    """The integer grid a 4-bit candidate rounds the block weights to (what finetune.qat can train for);
    None for 8-bit and for float code books (bitsandbytes' NF4/FP4)."""
    return cand.format.grid(cand)


def versions(cand: Candidate) -> dict:
    """Versions of the packages that wrote a candidate's folder (pipeline.json lists the core ones)."""
    return package_versions(cand.format.PACKAGES)


def tags(cand: Candidate) -> list[str]:
    return [cand.backend, f"{cand.bits}-bit", "quantized"]
