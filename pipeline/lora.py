"""LoRA and QLoRA for the fine-tune stage: a PEFT adapter on the usual layers, then merged full weights."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import dist, families, models
from pipeline.errors import StageError

# Every projection of every block, as QLoRA does (peft's own defaults adapt only the attention): each family's
# `lora_targets` (GPT-2's c_proj names both its attention and MLP output); other architectures: all-linear.
DEFAULT_TARGETS = {t: list(f.lora_targets) for f in families.FAMILIES for t in f.model_types}


@dataclass
class LoraSettings:
    r: int = 8  # adapter rank (`lora` and `qlora`)
    alpha: float = 16.0  # the adapter's update is scaled by alpha / r
    # dropout on the adapter's input; null = 0.05, or 0 on a model whose experts are fused into 3-D weights
    # (mixture-of-experts models in transformers 5), which peft adapts through its ParamWrapper, which takes none
    dropout: float | None = None
    # layer names to adapt; null = GPT-2 `c_attn, c_proj, c_fc`, Llama/Mistral/Qwen2/Gemma `q/k/v/o/gate/up/down_proj`,
    # other architectures `[all-linear]`
    target_modules: list[str] | None = None

    def check(self) -> list[str]:
        problems = []
        if self.r < 1:
            problems.append(f"r: {self.r} must be at least 1")
        if self.alpha <= 0:
            problems.append(f"alpha: {self.alpha} must be positive")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"dropout: {self.dropout} must be in [0, 1)")
        if self.target_modules == []:
            problems.append("target_modules: empty; name modules (e.g. [q_proj, v_proj]), use [all-linear], or null")
        return problems


@dataclass
class QLoraSettings:
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit type of the frozen base: `nf4` or `fp4` (bitsandbytes)
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit per weight saved)
    # matmul dtype of the 4-bit layers: `auto` (bf16/fp16 on GPUs, fp32 on CPU), `fp32`, `bf16`, `fp16`
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


def bitsandbytes_missing() -> bool:
    return importlib.util.find_spec("bitsandbytes") is None


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)  # peft's rule for a list of names


def adaptable(model) -> dict[str, torch.nn.Module]:
    """Linear and Conv1D modules by full name, without the output head (which LoRA leaves alone)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def targets(model, settings: LoraSettings) -> list[str] | str:
    """The recipe's target modules (each must match something) or the architecture's default."""
    chosen = settings.target_modules or DEFAULT_TARGETS.get(model.config.model_type, ["all-linear"])
    if chosen == ["all-linear"]:
        return "all-linear"
    names = adaptable(model)
    missing = [t for t in chosen if not any(_matches(n, [t]) for n in names)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise StageError(
            f"finetune.lora.target_modules: {missing} match no layer of this {model.config.model_type} model; "
            f"its adaptable layers are: {', '.join(short)} (or use [all-linear])"
        )
    return chosen


def _fan_in_fan_out(model, chosen: list[str] | str) -> bool:
    """GPT-2's Conv1D stores weights transposed; peft must know to merge them correctly."""
    from transformers.pytorch_utils import Conv1D

    picked = adaptable(model).items()
    return any(isinstance(m, Conv1D) and (chosen == "all-linear" or _matches(n, chosen)) for n, m in picked)


def fused_experts(model) -> list[str]:
    """The 3-D expert weights of a mixture-of-experts model (transformers 5 fuses each layer's experts into one
    [experts, out, in] tensor per projection): peft's `all-linear` adapts them as parameters (ParamWrapper)."""
    return [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]


def dropout(model, settings: LoraSettings, chosen: list[str] | str) -> float:
    """The adapter dropout: the recipe's, else 0.05, or 0 where peft adapts fused experts (it refuses any other)."""
    experts = fused_experts(model) if chosen == "all-linear" else []
    if settings.dropout is None:
        return 0.0 if experts else 0.05
    if experts and settings.dropout > 0:
        raise StageError(f"finetune.lora.dropout: {settings.dropout} cannot apply to this "
                         f"{model.config.model_type} model: its experts are fused 3-D weights ({experts[0]}, ...), "
                         "which peft adapts without dropout; set finetune.lora.dropout: 0 (or null)")
    return settings.dropout


def add_adapter(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    chosen = targets(model, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=dropout(model, settings, chosen),
        target_modules=chosen,
        fan_in_fan_out=_fan_in_fan_out(model, chosen),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _compute_dtype(choice: str) -> torch.dtype:
    if choice == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def load_4bit(folder: Path, q: QLoraSettings, gradient_checkpointing: bool):
    """The base model with frozen 4-bit weights, ready for an adapter (peft's kbit preparation)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    device = models.pick_device()
    if bitsandbytes_missing() or device.type == "mps":
        raise StageError("finetune.method qlora: needs bitsandbytes on CPU or CUDA (pip install bitsandbytes); "
                         "use method: lora instead")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                             bnb_4bit_compute_dtype=_compute_dtype(q.compute_dtype))
    place = {"": dist.local_rank()} if device.type == "cuda" else "cpu"  # each DDP rank holds a whole copy
    try:
        model = models.load_model(models.Source("folder", str(folder)), quantization_config=bnb, device_map=place)
    except (ImportError, RuntimeError, ValueError) as err:
        raise StageError(f"finetune.method qlora: bitsandbytes cannot load 4-bit weights here ({err}); "
                         "use method: lora instead") from err
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def merged(input_folder: Path, adapter_dir: Path):
    """The saved adapter merged into the base reloaded in its saved (full) precision. For QLoRA this avoids
    baking the 4-bit copy's rounding into every merged weight; for LoRA under FSDP/DeepSpeed the in-memory
    base is only a shard. One path for all keeps the merge tested."""
    from peft import LoraConfig, PeftModel

    base = models.load_model(models.Source("folder", str(input_folder)))
    config = LoraConfig.from_pretrained(adapter_dir)
    # the adapter was trained on Linear4bit layers; on GPT-2's Conv1D layers the update must be transposed
    config.fan_in_fan_out = _fan_in_fan_out(base, config.target_modules if isinstance(config.target_modules, str)
                                            else sorted(config.target_modules))
    return PeftModel.from_pretrained(base, adapter_dir, config=config).merge_and_unload()
