"""Quantize: bitsandbytes 8-bit (LLM.int8) weights, saved so `from_pretrained` reloads them."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import models
from pipeline.checkpoint import save_model, staging, write_record
from pipeline.context import Context, StageError, begin

USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer

# needs `pip install bitsandbytes`; the quantization config is read from config.json
model = AutoModelForCausalLM.from_pretrained("path/or/repo-id", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id")"""


@dataclass
class QuantizeConfig:
    enabled: bool = True
    input: str = "auto"  # model folder to quantize; auto = the distilled student (or the last stage before)
    method: Literal["bnb-int8"] = "bnb-int8"  # bitsandbytes LLM.int8 weight quantization
    threshold: float = 6.0  # LLM.int8 outlier threshold: activations above it stay in 16-bit

    def check(self) -> list[str]:
        if self.enabled and importlib.util.find_spec("bitsandbytes") is None:
            return ["method: bnb-int8 needs bitsandbytes: pip install bitsandbytes"]
        return []


def quantize_bnb_int8(folder: Path, threshold: float, device):
    from transformers import BitsAndBytesConfig

    qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model = models.load_model(models.Source("folder", str(folder)), quantization_config=qconfig, device_map=str(device))
    return model


def run(cfg: QuantizeConfig, ctx: Context) -> Path:
    stage = begin(ctx, "quantize", cfg)
    if stage is None:
        return ctx.run_dir / "quantize"
    folder = ctx.inputs["quantize"]
    device = models.pick_device()
    if device.type == "mps":
        raise StageError("quantize: bitsandbytes does not run on Apple MPS; run on CPU or CUDA")
    model = quantize_bnb_int8(folder, cfg.threshold, device)
    tokenizer = models.load_tokenizer(models.Source("folder", str(folder)))
    in_size = models.disk_size(folder)
    with staging(stage.out) as tmp:
        save_model(tmp, model, tokenizer)
        out_size = models.disk_size(tmp)
        write_record(tmp, stage.record(
            ctx,
            metrics={"params": models.count_params(model), "method": cfg.method, "bits": 8,
                     "input_mb": round(in_size / 2**20, 2), "disk_mb": round(out_size / 2**20, 2),
                     "size_ratio": round(out_size / in_size, 4)},
            tags=["bitsandbytes", "8-bit", "quantized"],
            usage=USAGE,
            summary=f"bitsandbytes LLM.int8 weights (threshold {cfg.threshold}): "
            f"{in_size / 2**20:.1f} MB → {out_size / 2**20:.1f} MB on disk.",
        ))
    return stage.out
