"""The OpenVINO folder: `openvino_model.xml/.bin` (IR) as optimum-intel's `OVModelForCausalLM.save_pretrained`
writes it, weights compressed by NNCF; `OVModelForCausalLM.from_pretrained` reloads it and runs it on the CPU
through OpenVINO. The `openvino-*` candidates export through optimum-intel with NNCF weight compression."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from pipeline import compat, models

# optimum-intel 2.2.0 imports its vision-language module eagerly, and that module fails to import with
# transformers >= 5.17: the hook keeps it from taking OVModelForCausalLM down with it (see pipeline/compat.py)
compat.install()

log = logging.getLogger("pipeline")

NAME = "openvino"
BACKEND = "openvino"
PACKAGES = ["optimum-intel", "optimum", "openvino", "nncf"]
# imported before a folder's peak memory is measured: library code, the same for every model (pipeline/memprobe.py)
RUNTIME = ("openvino", "optimum.intel.openvino")  # (optimum.intel alone imports lazily)
METHODS = {"openvino-int8": 8, "openvino-int4": 4}
OPTIONS = {
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
    "all_layers": ("openvino-int4",),
    "calibration_samples": ("openvino-int4",),
    "calibration_tokens": ("openvino-int4",),
}
INSTALL = ("pip install openvino openvino-tokenizers nncf optimum==2.3.0 && pip install --no-deps "
           "optimum-intel==2.2.0 (or `make install`)")
# The tokenizer and detokenizer as OpenVINO models (optimum-intel's OV_TOKENIZER_NAME / OV_DETOKENIZER_NAME):
# OpenVINO GenAI's LLMPipeline and the OpenVINO model server tokenize inside OpenVINO and refuse a folder without them
TOKENIZER_IRS = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
# text the converted tokenizer must split as the transformers one does: prose, digits, code, accents, other scripts
TOKENIZER_CHECK = "The Python interpreter reads 12 lines.\n\tdef f(x):  return x  # naïve café — 東京 Ünïcode"


def holds(folder: Path) -> bool:
    return (Path(folder) / "openvino_model.xml").is_file()


def load(folder: Path, **kwargs):
    """`OVModelForCausalLM` and the tokenizer beside it; device_map and the like are torch loading options,
    OpenVINO picks its own device."""
    try:
        from optimum.intel import OVModelForCausalLM
    except ImportError as err:
        raise models.ModelSourceError(f"'{folder}' is an OpenVINO model folder; loading it needs optimum-intel: "
                                      f"{INSTALL}") from err
    return (OVModelForCausalLM.from_pretrained(folder, use_cache=kv_cache(folder)),
            models.load_tokenizer(models.Source("folder", str(folder))))


def kv_cache(folder: Path) -> bool:
    """Whether the IR takes a KV cache (a stateful model, or past_key_values inputs). optimum-intel loads one
    exported without it (`use_cache=False` at export, by a user or a tool) only when told `use_cache=False`."""
    import openvino as ov

    model = ov.Core().read_model(str(Path(folder) / "openvino_model.xml"))
    return any(name.startswith(("past_key_values", "beam_idx")) for port in model.inputs for name in port.get_names())


def weight_files(folder: Path) -> list[Path]:
    """The model's IR: the graph (.xml) and the weights (.bin); not the tokenizer's IRs beside it (a GGUF file
    holds its tokenizer too, but a transformers folder's size leaves tokenizer.json out, and so does this)."""
    tokenizer = {Path(name).stem for name in TOKENIZER_IRS}
    return [p for p in Path(folder).glob("openvino_*") if p.suffix in (".xml", ".bin") and p.stem not in tokenizer]


def usage(folder: Path, ref: str) -> str:
    cached = kv_cache(folder)
    text = ("from optimum.intel import OVModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            "# needs `pip install optimum-intel openvino`; runs on the CPU through OpenVINO, weights stay compressed\n"
            + ("" if cached else "# exported without KV cache, so optimum-intel needs use_cache=False\n")
            + f'model = OVModelForCausalLM.from_pretrained("{ref}"{"" if cached else ", use_cache=False"})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{ref}")')
    if cached and genai_ready(folder):  # LLMPipeline needs the KV cache (a stateful model) and the tokenizer IRs
        local = Path(ref).is_dir()
        text += ("\n\n# or with OpenVINO GenAI (`pip install openvino-genai`), which reads a local folder\n"
                 + ("import openvino_genai\n\n" if local else "import huggingface_hub\nimport openvino_genai\n\n")
                 + "pipe = openvino_genai.LLMPipeline("
                 + (f'"{ref}"' if local else f'huggingface_hub.snapshot_download("{ref}")') + ', "CPU")\n'
                 'print(pipe.generate("The Python interpreter", max_new_tokens=64))')
    return text


def genai_ready(folder: Path) -> bool:
    """Whether the folder holds the tokenizer IRs OpenVINO GenAI needs."""
    return all((Path(folder) / name).is_file() for name in TOKENIZER_IRS)


def card_section(folder: Path, repo_id: str | None) -> str:
    return ""


def lm_eval_model(model, tokenizer, folder: Path, batch_size: int):
    """lm-eval's own OpenVINO model type (`openvino`, OptimumLM) over the folder."""
    from lm_eval.models.optimum_lm import OptimumLM

    return OptimumLM(pretrained=str(folder), tokenizer=tokenizer, batch_size=batch_size,
                     **({} if kv_cache(folder) else {"use_cache": False}))


# --- quantize candidates (optimum-intel + NNCF) ----------------------------------------------------------

def unavailable(cand, device: torch.device) -> str | None:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        from optimum.intel import OVModelForCausalLM  # noqa: F401
    except ImportError:
        return f"needs optimum-intel with OpenVINO: {INSTALL}"
    return None


def lifted_below(config) -> str | None:
    """The transformers release below which the pipeline lifts optimum-intel's transformers cap on this model's
    export (pipeline/compat.py, as measured), or None where it lifts nothing."""
    if unavailable(None, torch.device("cpu")) is not None:
        return None
    export, _ = _export_config(config)
    return compat.EXPORT_MEASURED.get(getattr(export, "__name__", ""))


def _export_config(config):
    """optimum-intel's OpenVINO export config class for this model's type, or None and why it has none."""
    import optimum.exporters.openvino  # noqa: F401 -- registers the OpenVINO export configs
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="openvino", model_type=getattr(config, "model_type", None), task="text-generation-with-past",
            library_name="transformers")
    except (KeyError, ValueError) as err:
        return None, str(err).strip("'\"").split(". Only")[0]
    return getattr(constructor, "func", constructor), None


def unsupported(config) -> str | None:
    """Why optimum-intel cannot export a model with this config here, or None if it can (or optimum-intel is
    missing: the candidate then reports itself unavailable). The export's own refusals, asked before any work:
    architectures it has no export config for, and the transformers versions an export config allows."""
    if unavailable(None, torch.device("cpu")) is not None:
        return None
    import importlib.metadata as md

    from packaging.version import Version

    model_type = getattr(config, "model_type", None)
    export, reason = _export_config(config)
    if export is None:
        return f"optimum-intel {md.version('optimum-intel')} cannot export it to OpenVINO ({reason})"
    have = Version(md.version("transformers"))
    low, high = (getattr(export, key, None) for key in ("MIN_TRANSFORMERS_VERSION", "MAX_TRANSFORMERS_VERSION"))
    if low is not None and have < Version(str(low)):
        return (f"optimum-intel's OpenVINO export of '{model_type}' needs transformers >= {low}; this is {have}")
    if high is not None and have > Version(str(high)):
        measured = compat.EXPORT_MEASURED.get(export.__name__)  # where the pipeline lifts the cap (compat.py)
        return (f"optimum-intel's OpenVINO export of '{model_type}' allows transformers <= "
                f"{str(high).replace('99', '*')}; this is {have}"
                + (f" (measured to export correctly below {measured}, where the pipeline lifts the cap: "
                   f"pip install 'transformers<{measured}')" if measured else ""))
    return None


def check(cand) -> list[str]:
    """The refusals optimum-intel itself knows about, at validation instead of mid-run."""
    if unavailable(cand, torch.device("cpu")) is not None:
        return []
    try:
        config(cand)
    except ValueError as err:
        return [f"optimum-intel refuses these options: {err}"]
    return []


def config(cand, statistics_path: Path | None = None):
    from optimum.intel import OVWeightQuantizationConfig

    options = {"bits": cand.bits, "sym": bool(cand.sym)}
    if cand.method == "openvino-int4":
        # The default group size is adjusted per layer where it does not divide the weight (SmolLM2's 576
        # channels, say), as optimum-intel's own int4 presets do; a group size the recipe sets is used as given.
        options.update(group_size=128 if cand.group_size is None else cand.group_size,
                       group_size_fallback="adjust" if cand.group_size is None else "error",
                       ratio=1.0 if cand.ratio is None else cand.ratio, all_layers=bool(cand.all_layers),
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


def convert(cand, job):
    """The input folder exported and compressed (in memory, not compiled, not yet saved). Data-aware
    candidates share, through `job.calibration`, the float export, the collected inputs and nncf's statistics
    of candidates that ask for the same calibration set."""
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizer

    if not cand.data_aware:
        return _export(job.source, job.trust_remote_code, quantization_config=config(cand))
    calibration = job.calibration
    if calibration is None:
        raise ValueError(f"{cand.label} is data-aware and needs calibration blocks")
    model = OVModelForCausalLM.from_pretrained(_float_ir(calibration, job.source, job.trust_remote_code),
                                               compile=False)
    shape = cand.calibration_shape(calibration.block_size)
    settings = config(cand, calibration.work / f"nncf-statistics-{shape[0]}x{shape[1]}")
    quantizer = OVQuantizer.from_pretrained(model)
    quantizer.quantize(ov_config=OVConfig(quantization_config=settings),
                       calibration_dataset=_dataset(calibration, model, quantizer, settings, shape))
    return model


def _float_ir(calibration, source: Path, trust_remote_code: bool) -> Path:
    folder = calibration.work / "openvino-fp32"
    if not (folder / "openvino_model.xml").exists():
        _export(source, trust_remote_code, load_in_8bit=False).save_pretrained(folder)
    return folder


def _dataset(calibration, model, quantizer, settings, shape: tuple[int, int]):
    """The model inputs optimum-intel collects from the calibration blocks, once per shape."""
    key = ("openvino-inputs", shape)
    if key not in calibration.cache:
        import datasets
        import nncf
        from nncf.definitions import NNCF_DATASET_RESET_STATE_KEY

        ids = calibration.blocks(*shape)
        rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        collected = quantizer.dataset_builder.build_from_dataset(settings, rows)["model"]
        model.clear_requests()  # collecting compiled the float model; it is recompiled after compression
        # Each sample is one prefill (generate with max_new_tokens=1), so the flag optimum-intel adds to
        # ask nncf to reset the KV state before it carries nothing: nncf resets a stateful model before
        # every inference anyway. Dropped because nncf's GPTQ feeds the samples to stateless subgraphs,
        # which refuse the flag ("Cannot reset state of a stateless model").
        samples = [{k: v for k, v in item.items() if k != NNCF_DATASET_RESET_STATE_KEY}
                   for item in collected.get_data()]
        calibration.cache[key] = {"model": nncf.Dataset(samples)}
    return calibration.cache[key]


def _export(source: Path, trust_remote_code: bool, **options):
    """`source` exported to OpenVINO IR by optimum-intel (not compiled), with `options` for the export."""
    from optimum.intel import OVModelForCausalLM

    with warnings.catch_warnings():  # tracing the torch model warns about every data-dependent branch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return OVModelForCausalLM.from_pretrained(source, export=True, compile=False,
                                                  trust_remote_code=trust_remote_code, **options)


def save(model, folder: Path, tokenizer=None) -> None:
    """The IR as optimum-intel writes it, the tokenizer files, and the tokenizer as OpenVINO models for GenAI."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        save_tokenizer_irs(tokenizer, Path(folder))


def save_tokenizer_irs(tokenizer, folder: Path) -> bool:
    """openvino_tokenizer/detokenizer.xml beside the model, as `optimum-cli export openvino` writes them with
    openvino-tokenizers installed (OVModelForCausalLM.save_pretrained does not), checked to split a sample as
    `tokenizer` does. Where they cannot be written or split differently, the folder keeps none of them (GenAI
    then refuses it instead of tokenizing otherwise) and a warning says why; optimum-intel loads it either way."""
    try:
        import openvino_tokenizers  # noqa: F401 -- registers the tokenizer operations with OpenVINO
        from optimum.exporters.openvino.convert import export_tokenizer
    except ImportError:
        log.warning("quantize: OpenVINO GenAI will not load %s: writing its tokenizer as OpenVINO models needs "
                    "openvino-tokenizers (pip install openvino-tokenizers, or `make install`)", folder)
        return False
    # export_tokenizer logs why a conversion failed at debug level and returns: keep the reason to say it (and
    # nothing else it logs); it also sets the tokenizer's padding and truncation side, which the stage goes on using
    reasons = _Records()
    convert_log = logging.getLogger("optimum.exporters.openvino.convert")
    kept = convert_log.handlers[:], convert_log.level, convert_log.propagate
    sides = tokenizer.padding_side, tokenizer.truncation_side
    convert_log.handlers, convert_log.propagate = [reasons], False
    convert_log.setLevel(logging.DEBUG)
    try:
        export_tokenizer(tokenizer, folder, task="text-generation-with-past")
    finally:
        convert_log.handlers, convert_log.propagate = kept[0], kept[2]
        convert_log.setLevel(kept[1])
        tokenizer.padding_side, tokenizer.truncation_side = sides
    problem = None
    if not genai_ready(folder):
        problem = ("openvino-tokenizers could not convert its tokenizer (" + type(tokenizer).__name__
                   + (f": {reasons.messages[-1]}" if reasons.messages else "") + ")")
    else:
        ours, theirs = _ir_token_ids(folder, TOKENIZER_CHECK), tokenizer(TOKENIZER_CHECK)["input_ids"]
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            problem = (f"openvino-tokenizers' conversion of its tokenizer splits {TOKENIZER_CHECK!r} otherwise: "
                       f"from token {at} on it gives {ours[at:at + 6]}, the tokenizer "
                       f"{theirs[at:at + 6]} ({tokenizer.decode(theirs[at:at + 6])!r})")
    if problem:
        for name in TOKENIZER_IRS:
            for path in (folder / name, (folder / name).with_suffix(".bin")):
                path.unlink(missing_ok=True)
        log.warning("quantize: OpenVINO GenAI will not load %s: %s; OVModelForCausalLM loads it", folder, problem)
        return False
    return True


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _ir_token_ids(folder: Path, text: str) -> list[int]:
    """Token ids the tokenizer IR gives `text`, as GenAI computes them (openvino-tokenizers' operations)."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401

    out = ov.Core().compile_model(str(folder / TOKENIZER_IRS[0]), "CPU")([text])
    return [int(i) for i in out["input_ids"][0]]


def describe(cand) -> str:
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


def grid(cand) -> dict | None:
    """The integer grid int4 rounds the block weights to (what finetune.qat can train for); None for int8."""
    if cand.method == "openvino-int4":
        return {"bits": 4, "group_size": 128 if cand.group_size is None else cand.group_size,
                "symmetric": bool(cand.sym)}
    return None
