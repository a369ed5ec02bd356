"""Quantization-aware fine-tuning with torchao: the decoder's linear weights are fake-quantized to the grid of
the 4-bit format that will ship (bits, group size, symmetric or not) while they train, then the fake
quantizers are removed again, so the stage still writes an ordinary float checkpoint that every quantize
candidate can consume; the candidate whose grid matches gets weights that already sit well on it."""
from __future__ import annotations

from dataclasses import dataclass

QAT_INSTALL = "pip install torchao  (or: pip install -e '.[qat]')"


@dataclass
class QatSettings:
    enabled: bool = False  # train on the grid (needs `method: full`)
    bits: int = 4  # integer bits of the grid
    # weights sharing one scale; -1 = per channel; must divide every block layer's input width. Set the
    # candidate's `group_size` to the same value
    group_size: int = 64
    symmetric: bool = False  # false = with zero points, as `openvino-int4`'s default `sym: false`
    # torchtune's key: plain float training for the first N steps, on the grid from step N on
    # why: fake quantization from step 0 costs a jump in loss the short fine-tunes here never win back
    fake_quant_after_n_steps: int = 0

    def check(self) -> list[str]:
        problems = []
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            problems.append(f"bits: {self.bits} is not an integer grid torchao fakes; use 2-8 (4 for int4)")
        if self.group_size == 0 or self.group_size < -1:
            problems.append(f"group_size: {self.group_size} must be positive, or -1 for one scale per channel")
        if self.fake_quant_after_n_steps < 0:
            problems.append(f"fake_quant_after_n_steps: {self.fake_quant_after_n_steps} must be 0 or more")
        if self.enabled and missing():
            problems.append(f"enabled: QAT needs torchao: {QAT_INSTALL}")
        return problems

    @property
    def grid(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def missing() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return True
    return False


def _targets(model) -> dict:
    """The linear layers of the transformer blocks; the embeddings and the (often tied) LM head stay
    float, as the int4 candidates keep them in 8-bit."""
    import torch

    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def refusal(model, settings: QatSettings) -> str | None:
    """Why this model cannot be trained on this grid, or None."""
    from transformers.pytorch_utils import Conv1D

    if any(isinstance(m, Conv1D) for m in model.modules()):
        return ("GPT-2's fused Conv1D layers are not covered by torchao's QAT (it swaps nn.Linear only); "
                "turn finetune.qat off for this model, or quantize it without QAT")
    targets = _targets(model)
    if not targets:
        return "the model has no nn.Linear layers in its blocks to fake-quantize"
    if settings.group_size != -1:
        odd = sorted({m.in_features for m in targets.values() if m.in_features % settings.group_size})
        if odd:
            return (f"group_size {settings.group_size} does not divide the input width {odd[0]} of some layers; "
                    "use a divisor (and the same group_size on the int4 candidate)")
    return None


def _config(settings: QatSettings, step: str):
    import torch
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain

    granularity = PerAxis(0) if settings.group_size == -1 else PerGroup(settings.group_size)
    # torchao computes asymmetric group parameters with a zero point in the float domain (min + scale *
    # 2^(bits-1)); left at its default integer domain it casts that zero point to int32 and shifts the
    # grid off the weights (SmolLM2, int4 g32: perplexity 64 fake-quantized instead of 14.4). Say so.
    zero_point = {} if settings.symmetric else {"zero_point_domain": ZeroPointDomain.FLOAT,
                                                 "zero_point_precision": torch.float32}
    weights = IntxFakeQuantizeConfig(getattr(torch, f"int{settings.bits}"), granularity=granularity,
                                     is_symmetric=settings.symmetric, **zero_point)
    return QATConfig(weight_config=weights, step=step) if step == "prepare" else QATConfig(step=step)


def prepare(model, settings: QatSettings):
    """Swap the block linears for torchao's FakeQuantizedLinear (in place); returns how many were swapped."""
    from torchao.quantization import quantize_

    names = set(_targets(model))
    quantize_(model, _config(settings, "prepare"), filter_fn=lambda module, fqn: fqn in names)
    return len(names)


def set_fake_quant(model, enabled: bool) -> None:
    """Switch the weight fake quantizers of a prepared model on or off (torchao's `enabled` flag)."""
    for module in model.modules():
        quantizer = getattr(module, "weight_fake_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = enabled


def delayed_start(after_steps: int):
    """A Trainer callback that keeps fake quantization off before step `after_steps` and on from it; it
    reads the global step, so a resumed run is on the same schedule."""
    from transformers import TrainerCallback

    class FakeQuantAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            set_fake_quant(model, state.global_step >= after_steps)

    return FakeQuantAfter()


def convert(model):
    """Swap the fake-quantized linears back to plain nn.Linear with the trained float weights (in place)."""
    from torchao.quantization import quantize_

    quantize_(model, _config(QatSettings(), "convert"))
    return model


def describe(grid: dict) -> str:
    group = "per channel" if grid["group_size"] == -1 else f"groups of {grid['group_size']}"
    return f"int{grid['bits']} {'symmetric' if grid['symmetric'] else 'asymmetric'}, {group}"
