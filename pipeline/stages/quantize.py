"""Quantize: try each candidate method on each input, ship the best one that meets every budget.

The inputs (by default the chain's student and the fine-tuned model it descends from) each get every candidate,
so plain quantization of the fine-tuned model competes with prune + distill + quantize. Every candidate is
converted, saved, reloaded from its folder and scored on the validation split and the run's general English with
the evaluate stage's sliding windows: perplexity, and KL divergence from / top-1 agreement with the reference
(the fine-tuned model). Budgets (quality losses against the reference, size, speed) reject candidates; `prefer`
picks the winner among the rest, which becomes the stage output, and the record says which budget bound the
choice and which candidates are dominated (no smaller and no better than another). A candidate that cannot run
here or fails to convert is reported and the others go on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline import data, errors, formats, frontier, general, models, qat, scoring
from pipeline import quant_backends as backends
from pipeline.context import Context, begin, stage_fingerprint
from pipeline.errors import StageError
from pipeline.folders import save_model, staging, write_record
from pipeline.metrics import speed
from pipeline.quant_backends import Candidate
from pipeline.records import fingerprint, origin, read_record, read_stage
from pipeline.stages.evaluate import DEFAULT_PROMPTS, EvaluateConfig

log = logging.getLogger("pipeline")


@dataclass
class QuantizeConfig:
    enabled: bool = True  # run this stage
    # folder to quantize; `auto` = the previous enabled stage's output; a PEFT adapter folder is merged first
    input: str = "auto"
    # every folder whose candidates compete: stage folders (`base`, `finetune`, `prune`, `distill`), `auto`, or
    # paths; null = `input` and, when `input` is auto and a student, the fine-tuned model it descends from (so
    # quantizing the fine-tuned model alone competes with prune + distill + quantize); set either this or `input`
    inputs: list[str] | None = None
    # methods to try, each a mapping: `method`, its options (below), and an optional `name` to try one method twice
    candidates: list[Candidate] = field(default_factory=lambda: [Candidate("bnb-int8")])
    # Budgets; a candidate ships only if it meets all that are set (null = no limit). Quality is measured against
    # the reference, the run's fine-tuned model (its base model when fine-tuning is off).
    # percent validation perplexity a candidate may add over the reference (on the fine-tuned SmolLM2-135M OpenVINO
    # int8 costs about +1%, data-free int4 +21% to +31%, data-aware int4 +5% to +12%: see below)
    max_ppl_increase: float | None = 3.0
    # percent perplexity on the run's general English (`general`) a candidate may add over the reference: what the
    # chain forgot outside the recipe's domain
    max_general_ppl_increase: float | None = None
    max_kl: float | None = None  # mean KL divergence from the reference on the validation split, nats per token
    max_mb: float | None = None  # size on disk, MB (2^20 bytes)
    max_size_share: float | None = None  # size on disk as a share of the base model's, e.g. 0.15
    min_gen_tok_s: float | None = None  # greedy generation speed on this machine (needs speed_tokens > 0)
    min_prefill_tok_s: float | None = None  # prompt processing speed on this machine (needs speed_tokens > 0)
    # winner among candidates within budget: `size` (smallest on disk), `speed` (fastest greedy generation),
    # `quality` (lowest perplexity)
    prefer: Literal["size", "speed", "quality"] = "size"
    # gate perplexity windows; the defaults are evaluate's: keep them equal to the `evaluate` section so gate and
    # report agree
    context: int = EvaluateConfig.context
    stride: int = EvaluateConfig.stride  # ditto
    max_tokens: int | None = EvaluateConfig.max_tokens  # ditto
    kl_tokens: int = EvaluateConfig.kl_tokens  # ditto: positions per text compared with the reference (0 = none)
    # greedy tokens generated per prompt (evaluate's default prompts) to time each candidate; 0 = no timing
    speed_tokens: int = 16
    # also try the candidates on an input that itself breaks a quality budget (max_ppl_increase,
    # max_general_ppl_increase, max_kl); false: its candidates are skipped, and the table says why
    # why: quantizing adds error: no candidate of bench/results/quantize.json scored more than 1% below its input,
    # so an input over a quality budget by itself cannot ship, and skipping it saves its conversions
    try_over_budget_inputs: bool = False

    def check(self) -> list[str]:
        problems = EvaluateConfig(context=self.context, stride=self.stride, max_tokens=self.max_tokens).check()
        if not self.candidates:
            problems.append("candidates: list at least one method, e.g. [{method: bnb-int8}]")
        labels = [c.label for c in self.candidates]
        for label in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"candidates: '{label}' appears twice; give each a distinct `name`")
        for key in ("max_ppl_increase", "max_general_ppl_increase", "max_kl"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                problems.append(f"{key}: {getattr(self, key)} must be non-negative, or null for no limit")
        for key in ("max_mb", "min_gen_tok_s", "min_prefill_tok_s"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                problems.append(f"{key}: {getattr(self, key)} must be positive, or null for no limit")
        if self.max_size_share is not None and not 0 < self.max_size_share <= 1:
            problems.append(f"max_size_share: {self.max_size_share} must be a share of the base's size in (0, 1]")
        if self.kl_tokens < 0:
            problems.append(f"kl_tokens: {self.kl_tokens} must be 0 (no comparison) or more")
        if self.max_kl is not None and self.kl_tokens == 0:
            problems.append("max_kl: needs kl_tokens > 0 to compare candidates with the reference")
        if self.inputs is not None and self.input != "auto":
            problems.append(f"inputs: set either `input` ({self.input}) or `inputs`, not both; e.g. "
                            f"inputs: [{self.input}]")
        if self.inputs is not None and not self.inputs:
            problems.append("inputs: list at least one folder, e.g. [auto], or null for the default")
        if self.speed_tokens < 0:
            problems.append(f"speed_tokens: {self.speed_tokens} must be non-negative")
        if self.prefer == "speed" and self.speed_tokens == 0:
            problems.append("prefer: speed needs speed_tokens > 0 to time the candidates")
        for key in ("min_gen_tok_s", "min_prefill_tok_s"):
            if getattr(self, key) is not None and self.speed_tokens == 0:
                problems.append(f"{key}: needs speed_tokens > 0 to time the candidates")
        return problems


def full_precision(folder: Path, out: Path, trust_remote_code: bool = False) -> Path:
    """The input as a plain model folder: a PEFT adapter is merged into its base in float32 first,
    so that quantization rounds the merged weights once."""
    if not (folder / "adapter_config.json").is_file():
        return folder
    from peft import AutoPeftModelForCausalLM, PeftConfig

    log.info("quantize: %s holds a PEFT adapter; merging it into its base model in float32", folder)
    base = PeftConfig.from_pretrained(folder).base_model_name_or_path
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code).merge_and_unload()
    except (OSError, ValueError) as err:
        raise StageError(
            f"quantize.input: the adapter in '{folder}' adapts '{base}', which could not be loaded ({err}). "
            "Point quantize.input at the stage folder that holds the merged weights (e.g. runs/<recipe>/finetune)."
        ) from err
    tok_source = folder if (folder / "tokenizer_config.json").is_file() else Path(folder).parent
    if not (tok_source / "tokenizer_config.json").is_file():  # an adapter saved on its own: the base's
        tok_source = base
    tokenizer = models.load_tokenizer(models.Source("folder", str(tok_source)))
    save_model(out, model, tokenizer)
    return out


def measure(model, tokenizer, texts, cfg: QuantizeConfig, reference: scoring.Reference,
            folder: Path | None = None, store: scoring.Measurements | None = None) -> dict:
    """Gate quality on every text (the evaluate stage's windows; KL and top-1 against the reference) and, if
    asked, prefill/generate speed; a stage folder's quality is kept in `store` for the evaluate stage."""
    started = time.perf_counter()
    evaluations = scoring.measure(model, texts, cfg.context, cfg.stride, EvaluateConfig.batch_size, reference, folder,
                                  store, "quantize")
    first = evaluations[0]
    out = {"perplexity": first["perplexity"], "scored_tokens": first["scored_tokens"],
           "eval_tok_s": round(sum(e["scored_tokens"] for e in evaluations) / (time.perf_counter() - started), 1),
           "quality": {e["dataset"]: e["perplexity"] for e in evaluations}, "evaluations": evaluations}
    if "kl" in first:
        out.update(kl=first["kl"], top1=first["top1"])
    if general.LABEL in out["quality"]:
        out["general_perplexity"] = out["quality"][general.LABEL]
    if cfg.speed_tokens:  # the evaluate stage's prompts and prefill length, one timed run after a warm-up
        timed = speed(model, tokenizer, DEFAULT_PROMPTS, EvaluateConfig.prefill_tokens, cfg.speed_tokens, 1)
        out.update(prefill_tok_s=timed["prefill_tok_s"], gen_tok_s=timed["gen_tok_s"], speed_noisy=timed["speed_noisy"],
                   speed_noise=timed["speed_noise"])
    return out


def candidate_row(cand: Candidate, label: str | None, input_name: str | None) -> dict:
    """What a candidate's row says of it before it is tried: its name, input, method and options."""
    options = {k: v for k, v in dataclasses.asdict(cand).items() if v is not None and k not in ("method", "name")}
    return {"name": label or cand.label, "candidate": cand.label, "input": input_name, "method": cand.method,
            "backend": cand.backend, "bits": cand.bits, "options": options, "description": backends.describe(cand)}


def try_candidate(cand: Candidate, source: Path, folder: Path, tokenizer, texts, cfg: QuantizeConfig,
                  device: torch.device, ctx: Context, calibration: backends.Calibration,
                  reference: scoring.Reference, name: str | None = None, lineage_origin: str | None = None,
                  label: str | None = None, input_name: str | None = None) -> dict:
    """Convert, save, reload and score one candidate; failures become a row, never an exception."""
    row = candidate_row(cand, label, input_name)
    if cand.data_aware:
        sequences, tokens = cand.calibration_shape(calibration.block_size)
        row["calibration"] = {"split": "train", "sequences": sequences, "tokens_each": tokens}
    reason = backends.unavailable(cand, device)
    if reason:
        log.warning("quantize: %s cannot run here: %s", row["name"], reason)
        return {**row, "status": "unavailable", "error": reason}
    log.info("quantize: trying %s: %s", row["name"], row["description"])
    started = time.time()
    try:
        model = backends.quantize(cand, source, device, ctx.trust_remote_code, calibration, name, lineage_origin)
        backends.save(model, folder, cand, tokenizer)
        del model
        model, _ = formats.load_folder(folder, device_map=str(device))  # score exactly what is shipped
        row.update(measure(model, tokenizer, texts, cfg, reference))
    except Exception as err:  # noqa: BLE001 -- a broken candidate is reported, the others still run
        if errors.is_disk_full(err):  # not the candidate's fault: no other one will fit either
            # a conversion starts from the input in float (OpenVINO's export, GGUF's f16 file): about its size
            raise errors.disk_full(ctx.run_dir / "quantize", errors.bytes_under(folder), formats.disk_size(source),
                                   what=f"quantize candidate '{row['name']}'",
                                   cleanup="The candidates' folder is removed. ") from err
        log.warning("quantize: %s failed: %s", row["name"], err)
        message = " ".join(str(err).strip().splitlines()[:2])[:300]
        return {**row, "status": "failed", "error": f"{type(err).__name__}: {message}"}
    row.update(disk_mb=formats.disk_mb(folder), seconds=round(time.time() - started, 1))
    return row


def violations(row: dict, reference: dict, cfg: QuantizeConfig, base_mb: float | None = None) -> list[str]:
    """The budgets `row` breaks, each as `key (value > limit)`."""
    out = []

    def over(key, value, limit, fmt, below=False):
        if limit is not None and value is not None and (value < limit if below else value > limit):
            out.append(f"{key} ({fmt.format(value)} {'<' if below else '>'} {fmt.format(limit)})")

    over("max_ppl_increase", row.get("ppl_increase_pct"), cfg.max_ppl_increase, "{:.2f}%")
    over("max_general_ppl_increase", row.get("general_ppl_increase_pct"), cfg.max_general_ppl_increase, "{:.2f}%")
    over("max_kl", row.get("kl"), cfg.max_kl, "{:.4f}")
    over("max_mb", row.get("disk_mb"), cfg.max_mb, "{:.1f} MB")
    if cfg.max_size_share is not None and base_mb:
        over("max_size_share", row["disk_mb"] / base_mb, cfg.max_size_share, "{:.1%}")
    over("min_gen_tok_s", row.get("gen_tok_s"), cfg.min_gen_tok_s, "{:.1f}", below=True)
    over("min_prefill_tok_s", row.get("prefill_tok_s"), cfg.min_prefill_tok_s, "{:.0f}", below=True)
    return out


PREFER = {  # the order each preference ranks candidates in: first = best
    "size": lambda r: (r["disk_mb"], r["perplexity"]),
    "speed": lambda r: (-(r.get("gen_tok_s") or 0), r["perplexity"]),
    "quality": lambda r: (r["perplexity"], r["disk_mb"]),
}


def compare(row: dict, reference: dict) -> dict:
    """`row`'s losses against the reference: perplexity increases (validation, general English), size ratio,
    speed-up."""
    row["ppl_increase_pct"] = round(100 * (row["perplexity"] / reference["perplexity"] - 1), 3)
    if row.get("general_perplexity") and reference.get("general_perplexity"):
        row["general_ppl_increase_pct"] = round(
            100 * (row["general_perplexity"] / reference["general_perplexity"] - 1), 3)
    row["size_ratio"] = round(row["disk_mb"] / reference["disk_mb"], 4)
    if reference.get("gen_tok_s") and row.get("gen_tok_s"):
        row["speedup"] = round(row["gen_tok_s"] / reference["gen_tok_s"], 2)
    return row


QUALITY_BUDGETS = ("max_ppl_increase", "max_general_ppl_increase", "max_kl")


def hopeless(input_row: dict, reference: dict, cfg: QuantizeConfig) -> list[str]:
    """The quality budgets an (unquantized) input already breaks: none of its candidates can meet them."""
    if cfg.try_over_budget_inputs:
        return []
    return [v for v in violations(compare(dict(input_row), reference), reference, cfg)
            if v.split(" ")[0] in QUALITY_BUDGETS]


def gate(rows: list[dict], reference: dict, cfg: QuantizeConfig, base_mb: float | None = None) -> dict | None:
    """Mark each measured row passed / over budget against `reference` and the budgets; mark dominated rows;
    return the preferred passing row."""
    measured = [r for r in rows if "perplexity" in r]
    for row in measured:
        compare(row, reference)
        row["violates"] = violations(row, reference, cfg, base_mb)
        row["status"] = "over budget" if row["violates"] else "passed"
    frontier.mark(measured)
    passed = [r for r in rows if r["status"] == "passed"]
    return min(passed, key=PREFER[cfg.prefer]) if passed else None


def bound(rows: list[dict], winner: dict, cfg: QuantizeConfig) -> list[str]:
    """The budgets that kept a candidate better by `prefer` than the winner from shipping (none: the winner is
    the best measured candidate by that measure)."""
    key = PREFER[cfg.prefer]
    better = [r for r in rows if r.get("violates") and key(r) < key(winner)]
    return sorted({v.split(" ")[0] for r in better for v in r["violates"]})


def table(reference: dict, rows: list[dict], winner: dict | None, inputs: list[dict] = ()) -> str:
    def num(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "–"

    general_col = any(r.get("general_perplexity") is not None for r in [reference, *rows])
    kl_col = any(r.get("kl") is not None for r in rows)
    head = ["candidate", "method", "bits", "status", "perplexity", "Δ ppl"]
    head += ["general ppl", "Δ general"] if general_col else []
    head += ["KL", "top-1"] if kl_col else []
    head += ["disk MB", "size", "gen tok/s"]

    def cells(r, name, status):
        out = [name, r.get("method", "unquantized"), str(r.get("bits") or "–"), status,
               num(r, "perplexity", "{:.3f}"), num(r, "ppl_increase_pct", "{:+.2f}%")]
        if general_col:
            out += [num(r, "general_perplexity", "{:.3f}"), num(r, "general_ppl_increase_pct", "{:+.2f}%")]
        if kl_col:
            out += [num(r, "kl", "{:.4f}"), num(r, "top1", "{:.1%}")]
        gen = num(r, "gen_tok_s", "{:.1f}") + (" (noisy)" if r.get("speed_noisy") else "")
        return out + [num(r, "disk_mb", "{:.1f}"), num(r, "size_ratio", "{:.0%}"), gen]

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(cells({**reference, "size_ratio": 1.0}, f"{reference['name']} (reference)",
                                     "reference")) + " |"]
    for r in inputs:
        if r is not reference:
            lines.append("| " + " | ".join(cells(r, f"{r['name']} (input)", "unquantized")) + " |")
    for r in rows:
        status = "**chosen**" if r is winner else r["status"]
        if r.get("violates"):
            status += ": " + "; ".join(r["violates"])
        if r.get("dominated_by"):
            status += f"; dominated by {r['dominated_by']}"
        if r.get("error"):
            status += f": {r['error']}"
        lines.append("| " + " | ".join(cells(r, r["name"], status)) + " |")
    return "\n".join(lines)


def resolve_inputs(ctx: Context) -> list[Path]:
    """The folders to quantize: the stage's input, then the others the recipe names (see `inputs`)."""
    return [Path(ctx.inputs["quantize"]), *ctx.also.get("quantize", [])]


# Candidates an unfinished run of the stage converted and scored (each a folder and, once scored, its row as JSON),
# kept so that the same command goes on from them: after Ctrl-C or a kill, and after a gate that shipped nothing
# (a changed budget re-scores nothing). Removed when the stage finishes, on --force, and on a full disk.
WORK = ".quantize-work"
# gate settings: they choose among the rows, they do not change any (a candidate's key leaves them out)
GATE_ONLY = ("prefer", "try_over_budget_inputs", "candidates")


def scored_general(ctx: Context) -> tuple:
    """The general-English settings (the text every candidate is scored on besides the validation split) where they
    are not the defaults: part of the stage's fingerprint, so that changing them re-runs the gate, while a run made
    before they counted stays current."""
    settings = dataclasses.asdict(ctx.general)
    return () if settings == dataclasses.asdict(general.GeneralConfig()) else (settings,)


def candidate_keys(cfg: QuantizeConfig, ctx: Context, stage, labels: list[str]) -> dict[tuple[str, str], str]:
    """(input label, candidate label) -> a key that changes with whatever changes that candidate's folder or scores:
    the stage's fingerprint without the gate's settings (the budgets, `prefer`, the candidate list), the input and
    the candidate's own options."""
    measured = dataclasses.replace(cfg, **dict.fromkeys(BUDGETS + GATE_ONLY))  # one value whatever the recipe says
    base = stage_fingerprint(ctx, "quantize", measured, stage.parent, scored_general(ctx))
    return {(label, c.label): "candidate-" + fingerprint(base, label, dataclasses.asdict(c))
            for label in labels for c in cfg.candidates}


def _finished(work: Path, keys: set[str] | None = None) -> set[str]:
    """The keys of the finished candidates in `work` (a folder beside its scored row), among `keys` when given;
    everything else there (half-made candidates, other settings' ones, the moved winner, calibration caches) is
    removed."""
    done = {p.stem for p in work.glob("*.json") if (work / p.stem).is_dir() and (keys is None or p.stem in keys)}
    for item in work.iterdir():
        if item.name.removesuffix(".json") not in done:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    return done


@contextlib.contextmanager
def candidates_work(run_dir: Path, keys: set[str], force: bool):
    """The stage's work folder (WORK), holding only the finished candidates whose key is still wanted; yields it
    and the keys of those. Kept when the stage stops without shipping (interrupted, killed, no winner, a bug) while
    it holds a finished candidate; removed when it ships or the disk is full."""
    work = run_dir / WORK
    for stale in run_dir.glob(".quantize-candidates-*"):  # the temporary folders of runs before WORK existed
        shutil.rmtree(stale, ignore_errors=True)
    if force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work, _finished(work, keys)
    except BaseException as err:
        kept = 0 if errors.is_disk_full(err) else len(_finished(work))
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
            raise
        note = (f"The {kept} candidate(s) made and scored are kept in '{work}' ({errors.mb(errors.bytes_under(work))}): "
                "run again and they are not made again (--force makes them afresh; deleting the folder is safe).")
        if isinstance(err, StageError):
            raise StageError(f"{err}\n{note}") from err
        log.warning("quantize: %s", note)
        raise
    shutil.rmtree(work, ignore_errors=True)


def run(cfg: QuantizeConfig, ctx: Context) -> Path:
    stage = begin(ctx, "quantize", cfg, extra=scored_general(ctx))
    if stage is None:
        return ctx.run_dir / "quantize"
    device = models.pick_device()
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    inputs = resolve_inputs(ctx)
    for folder in inputs[1:]:
        if read_stage(folder) is None:
            raise StageError(f"quantize: input folder '{folder}' (quantize.inputs) is missing or incomplete (no "
                             "pipeline.json). Run the stage that writes it first, or leave it out of quantize.inputs.")
    several = len(inputs) > 1
    base = ctx.run_dir / "base"  # what max_size_share is a share of
    base_mb = formats.disk_mb(base) if read_record(base) is not None else None
    labels = [f.name if f.parent == ctx.run_dir else str(f) for f in inputs]
    keys = candidate_keys(cfg, ctx, stage, labels)
    # Candidate folders live next to the run (same disk, so the winner is moved, not copied)
    with candidates_work(ctx.run_dir, set(keys.values()), ctx.force) as (work, finished):
        primary = full_precision(inputs[0], work / "merged-0", ctx.trust_remote_code)
        tokenizer = models.load_tokenizer(models.Source("folder", str(primary)))
        texts = scoring.texts(ctx, tokenizer, cfg.max_tokens)
        log.info("quantize: %d candidate(s) on %d input(s) (%s): %d conversions, each reloaded and scored on %s",
                 len(cfg.candidates), len(inputs), ", ".join(f.name for f in inputs), len(cfg.candidates) * len(inputs),
                 " and ".join(t[0] for t in texts))
        ref_folder = ctx.reference if ctx.reference and read_stage(ctx.reference) else inputs[0]
        reference = scoring.Reference(ref_folder, cfg.kl_tokens, cfg.context, cfg.stride, EvaluateConfig.batch_size)
        # the reference is measured first so that its log-probabilities come from its own scoring pass
        order = sorted(range(len(inputs)), key=lambda i: not reference.is_(inputs[i]))
        rows, folders, measured_inputs, ref_row, params = [], {}, {}, None, {}
        store = scoring.Measurements(ctx.run_dir, ctx.force)
        if not any(reference.is_(f) for f in inputs):
            model, _ = formats.load_folder(ref_folder, device_map=str(device))
            ref_row = {"name": ref_folder.name, "disk_mb": formats.disk_mb(ref_folder),
                       **measure(model, tokenizer, texts, cfg, reference, ref_folder, store)}
            del model
        for i in order:
            folder = inputs[i]
            source = primary if i == 0 else full_precision(folder, work / f"merged-{i}", ctx.trust_remote_code)
            label = labels[i]
            model, _ = formats.load_folder(source, device_map=str(device))
            params[label] = models.count_params(model)
            measured_inputs[label] = {"name": label, "folder": str(folder),
                                      "disk_mb": formats.disk_mb(source),
                                      **measure(model, tokenizer, texts, cfg, reference,
                                                folder if source == folder else None, store)}
            del model
            if reference.is_(folder):
                ref_row = measured_inputs[label]
            log.info("quantize: input %s perplexity %.3f on %d tokens", label, measured_inputs[label]["perplexity"],
                     measured_inputs[label]["scored_tokens"])
            # Data-aware candidates calibrate on the training split (the gate scores the validation split); the
            # float export, the collected inputs and nncf's statistics are shared by candidates that ask alike.
            calibration = backends.Calibration(
                work / f"calibration-{i}", lambda n, tokens: data.calibration_blocks(
                    ctx.data, tokenizer, ctx.seed, n, "quantize calibration", block_size=tokens),
                ctx.data.block_size)
            record = read_stage(folder)
            # what formats name the model by (the GGUF file) and the source its lineage was loaded from (whose
            # GGUF pre-tokenizer a GGUF export keeps)
            name = (record.recipe if record else None) or folder.name
            broken = hopeless(measured_inputs[label], ref_row, cfg) if ref_row else []
            if broken:
                log.info("quantize: input %s already breaks %s unquantized: its %d candidate(s) are skipped "
                         "(quantize.try_over_budget_inputs: true tries them anyway)", label, "; ".join(broken),
                         len(cfg.candidates))
            for j, cand in enumerate(cfg.candidates):
                row_label = f"{label}/{cand.label}" if several else cand.label
                if broken:
                    rows.append({**candidate_row(cand, row_label, label), "status": "skipped",
                                 "error": f"the input {label} itself breaks " + "; ".join(broken)})
                    continue
                key = keys[label, cand.label]
                folders[row_label] = work / key
                if key in finished:  # converted and scored by an unfinished run of these settings
                    rows.append(json.loads((work / f"{key}.json").read_text()))
                    log.info("quantize: %s was converted and scored by an earlier run of these settings that did not "
                             "finish: its folder and scores are reused (--force makes it again)", row_label)
                    continue
                rows.append(try_candidate(cand, source, folders[row_label], tokenizer, texts, cfg, device, ctx,
                                          calibration, reference, name, origin(folder), row_label, label))
                if rows[-1].get("disk_mb") is not None:  # made and scored: worth keeping until the stage ships
                    tmp = work / f"{key}.json.tmp"
                    tmp.write_text(json.dumps(rows[-1]))
                    tmp.replace(work / f"{key}.json")
        winner = gate(rows, ref_row, cfg, base_mb)
        input_rows = list(measured_inputs.values())
        scores = table(ref_row, rows, winner, input_rows)
        log.info("quantize: candidates (%s, prefer %s):\n%s", budgets(cfg), cfg.prefer, scores)
        if winner is None and all(r["status"] == "skipped" for r in rows):
            raise StageError(
                f"quantize: every input already breaks a quality budget before quantization ({budgets(cfg)}), "
                f"measured against the reference {ref_row['name']} (perplexity {ref_row['perplexity']:.3f}):\n"
                f"{scores}\nRaise the budget the inputs break, add the reference itself to quantize.inputs, or "
                "improve the inputs (e.g. a longer distill)."
            )
        if winner is None and not any(r["status"] in ("over budget", "skipped") for r in rows):
            raise StageError(  # nothing was even scored: the budget is not what to change
                f"quantize: no candidate could be made (every one is unavailable or failed; the status column "
                f"says why):\n{scores}\nFix what it names, or add a candidate this model and machine support "
                "(bnb-int8 or openvino-int8)."
            )
        if winner is None:
            broken = sorted({v.split(" ")[0] for r in rows for v in r.get("violates", [])})
            raise StageError(
                f"quantize: no candidate met every budget ({budgets(cfg)}); broken: {', '.join(broken)}. Quality is "
                f"measured against the reference {ref_row['name']} (perplexity {ref_row['perplexity']:.3f}):\n"
                f"{scores}\nRaise the budget that binds (quantize.{broken[0] if broken else 'max_ppl_increase'}), "
                "or add a gentler candidate (bnb-int8 or openvino-int8)."
            )
        cand = next(c for c in cfg.candidates if c.label == winner["candidate"])
        chosen_input = Path(measured_inputs[winner["input"]]["folder"])
        source_row = measured_inputs[winner["input"]]
        qat_grid = _qat_check((read_stage(chosen_input) or stage.parent).qat, cand)
        binding = bound(rows, winner, cfg)
        dominated = [frontier.describe(r, next(x for x in rows if x["name"] == r["dominated_by"]))
                     for r in rows if r.get("dominated_by")]
        # what the gate measured of the shipped candidate is what evaluate would measure of the stage folder
        store.remember(stage.fingerprint, folders[winner["name"]], texts, cfg.context, cfg.stride, reference,
                       str(device), winner["evaluations"])
        # the winner's files are moved, not copied: it stops being a finished candidate a later run could reuse
        folders[winner["name"]].with_name(folders[winner["name"]].name + ".json").unlink(missing_ok=True)
        with staging(stage.out) as tmp:
            for item in folders[winner["name"]].iterdir():
                shutil.move(str(item), str(tmp / item.name))
            write_record(tmp, stage.record(
                ctx,
                parent=str(chosen_input),
                metrics={"params": params[winner["input"]], "method": cand.method, "bits": cand.bits,
                         "input_mb": source_row["disk_mb"], "disk_mb": winner["disk_mb"],
                         "size_ratio": winner["size_ratio"], "perplexity": winner["perplexity"],
                         "input_perplexity": source_row["perplexity"],
                         "reference_perplexity": ref_row["perplexity"], "ppl_increase_pct": winner["ppl_increase_pct"],
                         "general_perplexity": winner.get("general_perplexity"), "kl": winner.get("kl"),
                         "top1": winner.get("top1"), "gen_tok_s": winner.get("gen_tok_s"),
                         "input_gen_tok_s": source_row.get("gen_tok_s"), "bound_by": binding},
                chosen=winner["name"],
                backend_versions=backends.versions(cand),
                reference=ref_row,
                inputs=input_rows,
                candidates=rows,
                dominated=dominated,
                gate={**{k: getattr(cfg, k) for k in BUDGETS}, "prefer": cfg.prefer, "context": cfg.context,
                      "stride": cfg.stride, "scored_tokens": ref_row["scored_tokens"], "device": str(device),
                      "reference": str(ref_folder), "kl_tokens": cfg.kl_tokens,
                      "speed": {"prompts": DEFAULT_PROMPTS, "prefill_tokens": EvaluateConfig.prefill_tokens,
                                "new_tokens": cfg.speed_tokens, "repeats": 1}},
                qat=qat_grid,
                tags=backends.tags(cand),
                summary=summary(cand, winner, ref_row, rows, cfg, scores, binding, dominated),
            ))
    return stage.out


BUDGETS = ("max_ppl_increase", "max_general_ppl_increase", "max_kl", "max_mb", "max_size_share", "min_gen_tok_s",
           "min_prefill_tok_s")


def budgets(cfg: QuantizeConfig) -> str:
    """The budgets that are set, as the recipe states them."""
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in BUDGETS if getattr(cfg, k) is not None) or "no budget"


def _qat_check(trained: dict | None, cand: Candidate) -> dict | None:
    """Whether the input was trained (finetune.qat) for the grid the chosen candidate rounds to; warns if not."""
    if not trained:
        return None
    shipped = backends.grid(cand)
    # the record keeps the training schedule beside the grid; compare the grid's own keys
    matches = shipped == {key: trained.get(key) for key in qat.QatSettings().grid}
    if cand.bits == 4 and not matches:
        log.warning("quantize: the input was trained for %s (finetune.qat) but %s rounds to %s; set the candidate's "
                    "group_size/sym (or finetune.qat) so the grids agree", qat.describe(trained), cand.label,
                    qat.describe(shipped) if shipped else "a float code book")
    return {"trained_for": trained, "shipped": shipped, "matches": matches}


def summary(cand: Candidate, winner: dict, reference: dict, rows: list[dict], cfg: QuantizeConfig,
            scores: str, binding: list[str], dominated: list[str]) -> str:
    passed = sum(r["status"] == "passed" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    skipped_note = (f", {skipped} of them skipped because their input already breaks a quality budget unquantized"
                    if skipped else "")
    why = (f"Chosen for {cfg.prefer} among the {passed} of {len(rows)} candidates that met every budget "
           f"({budgets(cfg)}){skipped_note}; " + (f"the budget that bound the choice: {', '.join(binding)}." if binding
                                                  else f"no budget bound it: it is the best measured candidate for "
                                                  f"{cfg.prefer}."))
    general_note = (f", general English {winner['general_perplexity']:.3f} ({winner['general_ppl_increase_pct']:+.2f}%)"
                    if winner.get("general_ppl_increase_pct") is not None else "")
    kl_note = (f", KL {winner['kl']:.4f} nats/token and top-1 agreement {winner['top1']:.1%} against the reference"
               if winner.get("kl") is not None else "")
    lines = [
        f"**{winner['name']}**: {winner['description']}. {winner['disk_mb']:.1f} MB on disk ({winner['size_ratio']:.0%} "
        f"of the reference `{reference['name']}`, {reference['disk_mb']:.1f} MB), perplexity {reference['perplexity']:.3f} "
        f"→ {winner['perplexity']:.3f} ({winner['ppl_increase_pct']:+.2f}%){general_note}{kl_note}. {why}",
        "", scores, ""]
    if dominated:
        lines += ["Dominated (another candidate is no larger, within 0.1%, and no worse on every text):", ""]
        lines += [f"- {d}" for d in dominated] + [""]
    lines.append(
        f"Perplexity: validation split{' and general English (base-model samples)' if winner.get('general_perplexity') else ''}, "
        f"context {cfg.context}, stride {cfg.stride}, {reference['scored_tokens']} tokens; KL divergence "
        f"KL(reference ‖ candidate) on the first {cfg.kl_tokens} scored positions of the validation split. Generation "
        f"speed: greedy, {cfg.speed_tokens} new tokens for each of {len(DEFAULT_PROMPTS)} prompts, one timed run "
        "after a warm-up; (noisy): taken while other work loaded the machine (1-minute load above 1.5 per core).")
    return "\n".join(lines)
