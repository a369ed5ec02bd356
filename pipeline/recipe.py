"""Recipes: YAML files validated against the typed stage configs before any model is loaded."""
from __future__ import annotations

import json
import os
import string
import tempfile
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import get_args

import yaml

from pipeline import data, families, formats, ignored, lora, models, qat, quant_backends, sparsity, surgery
from pipeline.config import RecipeError, parse, set_dotted
from pipeline.data import DataConfig
from pipeline.general import GeneralConfig
from pipeline.errors import StageError
from pipeline.models import Source
from pipeline.stages import CHAINED, MODEL_FOLDERS, SECTIONS, distill, prune


@dataclass
class PushConfig:
    push_to_hub: bool = False  # `run` also pushes each stage folder as soon as it finishes
    # repo id per stage folder; `{user}`, `{recipe}` (the run name) and `{stage}` are filled in
    repo: str = "{user}/{recipe}-{stage}"
    user: str | None = None  # namespace (your user or an org); null = the token's user, from `whoami`
    private: bool = True  # visibility of repos the push creates (an existing repo keeps its own)
    # which of `base`, `finetune`, `prune`, `distill`, `quantize` `push` uploads (null = every stage folder)
    stages: list[str] | None = None

    def check(self) -> list[str]:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.repo) if f is not None}
        except ValueError as err:
            return [f"repo: '{self.repo}' is not a valid template ({err})"]
        problems = []
        if names - {"user", "recipe", "stage"}:
            problems.append(f"repo: unknown placeholder(s) {sorted(names - {'user', 'recipe', 'stage'})} in "
                            f"'{self.repo}'; use {{user}}, {{recipe}} and {{stage}}")
        if "stage" not in names:
            problems.append(f"repo: '{self.repo}' has no {{stage}}, so every stage would overwrite the same repo; "
                            "use e.g. {user}/{recipe}-{stage}")
        return problems


@dataclass
class RecipeSettings:
    """The recipe's top-level keys; `Recipe` adds a section per stage of the stage table, then `push`."""

    model: str  # Hub id (`gpt2`), a model folder, a `.gguf` file, or the offline alias `smollm2-135m`
    # a folder or Hub id whose tokenizer the model uses instead of its own: for a folder of weights that ships none
    # (the load stage saves it into base/, so every later stage has it); null = the model's own
    tokenizer: str | None = None
    name: str | None = field(default=None, metadata={"doc_default": "file name"})  # run folder: `<output_dir>/<name>/`
    output_dir: str = "runs"  # where run folders go
    seed: int = 42  # data split, initialisation and data order
    trust_remote_code: bool = False  # let transformers run code shipped with a Hub model
    # the load stage refuses a source whose tokenizer splits words its own vocabulary holds whole, or leaves out a
    # BOS token the model was trained with (a mis-converted GGUF file), or that predicts ~16 KB of the validation
    # text worse than lzma packs it (bits per byte: wrong or random weights, a wrong tokenizer, a BOS it needs and
    # does not get); false runs it anyway, and the report says so
    check_source: bool = True
    # a vision-language checkpoint (Gemma 3 4B+, Mistral 3, Llama 4, ...): true loads its language model alone as
    # the text model transformers has for it (vision tower and projector dropped: every output is text-only);
    # false refuses such a model at validation, so that nothing is dropped unasked
    text_only: bool = False
    data: DataConfig = field(default_factory=DataConfig)  # what to train and evaluate on
    # general English the base model writes, scored by every report and the quantize gate (never trained on)
    general: GeneralConfig = field(default_factory=GeneralConfig)

    def check(self) -> list[str]:
        problems = []
        if isinstance(self.name, str) and (self.name.strip() in ("", ".", "..") or any(c in self.name for c in "/\\")):
            # `<output_dir>/<name>/` must be a folder of its own there, not output_dir itself or one outside it
            problems.append(f"name: {self.name!r} is not a folder name (the run folder is <output_dir>/<name>/); use "
                            "one name without '/', e.g. name: quickstart-v2")
        source = None
        if isinstance(self.model, str):
            try:
                source = models.resolve(self.model, own_tokenizer=self.tokenizer is None)
            except models.ModelSourceError as err:
                problems.append(f"model: {err}")
        whole = models.peek_config(source, self.trust_remote_code, text=False)
        composite = models.composite(whole)
        if composite and not self.text_only:
            problems.append(f"model: {models.text_only_refusal(self.model, composite)}")
        elif self.text_only is True and whole is not None and not composite:  # (a wrong type is said already)
            problems.append(f"text_only: '{self.model}' is a text model already; remove text_only")
        if self.tokenizer is not None:
            try:
                models.tokenizer_source(self.tokenizer)
            except models.ModelSourceError as err:
                problems.append(f"tokenizer: {err}")
        if self.prune.enabled:
            problems += self._check_prune(source)
        problems += self._check_formats(source) + self._check_context(source) + self._check_finetune_layers(source)
        problems += self._check_distill(source) + self._check_chat_template(source)
        if self.finetune.enabled and self.finetune.method != "full" and self.finetune.input != "auto" \
                and sparsity.record_of(Path(self.finetune.input)) is not None:
            problems.append(f"finetune.method: '{self.finetune.input}' is sparse (its record says so), and merging a "
                            f"{self.finetune.method} adapter would fill its zeros; use method: full (the zeros then "
                            "stay fixed while it trains)")
        for stage in CHAINED:
            value = getattr(self, stage.name).input
            adapter = stage.name == "quantize" and (Path(value) / "adapter_config.json").is_file()  # merged first
            if value != "auto" and not (Path(value) / "config.json").is_file() and not adapter:
                problems.append(f"{stage.name}.input: '{value}' is not a model folder; use auto or a stage output "
                                "folder")
            elif value != "auto" and not adapter:
                problems += self._tokenizer_of(f"{stage.name}.input", value)
        if self.distill.teacher != "auto" and (Path(self.distill.teacher) / "config.json").is_file():
            problems += self._tokenizer_of("distill.teacher", self.distill.teacher)
        for name in ("prune", "distill"):
            stage = getattr(self, name)
            if stage.enabled and stage.own_text.tokens and (stage.data or self.data).format == "chat":
                problems.append(f"{name}.own_text: the model's own text is mixed into text data only, and "
                                f"{name}'s data is chat; set {name}.own_text.tokens: 0, or give {name}.data with "
                                "format: text")
        problems += self._check_quantize_input() + self._check_output_dir() + self._check_columns()
        made = {s.folder for s in SECTIONS if s.folder and getattr(self, s.name).enabled} | {MODEL_FOLDERS[0]}
        for key, names in (("evaluate.models", self.evaluate.models), ("push.stages", self.push.stages)):
            for i, name in enumerate(names or []):
                if name not in MODEL_FOLDERS:
                    problems.append(f"{key}[{i}]: {name!r} is not allowed; use one of: {', '.join(MODEL_FOLDERS)}")
                elif name not in made:  # evaluate would skip it (or score a stale folder), push would leave it out
                    problems.append(f"{key}[{i}]: '{name}' is not a model this recipe makes ({name}.enabled is "
                                    f"false); enable it or remove it from {key}")
        return problems

    def _check_columns(self) -> list[str]:
        """The columns each data config reads (data, <stage>.data, their mix sources) are in its local files. What
        <stage>.data shares with data (it takes every key it does not set) is data's problem, named once."""
        configs = self._stage_data()
        return data.column_problems(self.data, "data") + [
            problem for key, cfg in configs.items() if cfg is not None and cfg != self.data
            for problem in data.column_problems(cfg, key, skip=self.data)]

    def _stage_data(self) -> dict:
        """`<stage>.data` of every stage that has one (None where the recipe leaves it to `data`)."""
        return {f"{s.name}.data": getattr(self, s.name).data for s in SECTIONS
                if "data" in {f.name for f in fields(s.config)}}

    def _check_quantize_input(self) -> list[str]:
        """quantize.input and every quantize.inputs folder must hold full-precision weights: quantizing a quantized
        folder again is not a thing any of the formats does (bitsandbytes and OpenVINO refuse with an empty
        message, GGUF is not read); a stage named in quantize.inputs must be one the recipe runs."""
        problems = [] if self.quantize.input == "auto" else self._quantized("quantize.input", self.quantize.input)
        runs = {s.folder for s in SECTIONS if s.folder and getattr(self, s.name).enabled} | {MODEL_FOLDERS[0]}
        for i, value in enumerate(self.quantize.inputs or []):
            key = f"quantize.inputs[{i}]"
            if value == "auto" or value in runs - {"quantize"}:
                continue
            if value in MODEL_FOLDERS:
                problems.append(f"{key}: '{value}' is not a model this recipe makes"
                                + (f" ({value}.enabled is false); enable it or" if value != "quantize" else ";")
                                + f" use auto, a folder path, or one of: {', '.join(sorted(runs - {'quantize'}))}")
            elif not (Path(value) / "config.json").is_file() and not (Path(value) / "adapter_config.json").is_file():
                problems.append(f"{key}: '{value}' is neither a stage of this recipe nor a model folder; use auto, "
                                f"one of {', '.join(sorted(runs - {'quantize'}))}, or a folder holding config.json")
            else:
                problems += self._quantized(key, value)
                if (Path(value) / "config.json").is_file() and not (Path(value) / "adapter_config.json").is_file():
                    problems += self._tokenizer_of(key, value)
        return problems

    @staticmethod
    def _tokenizer_of(key: str, folder: str) -> list[str]:
        """A folder a stage reads must hold its tokenizer, as the recipe's model must (models.check_tokenizer)."""
        try:
            models.check_tokenizer(folder)
        except models.ModelSourceError as err:
            return [f"{key}: {err}"]
        return []

    def _quantized(self, key: str, value: str) -> list[str]:
        folder = Path(value)
        if not folder.is_dir():
            return []
        fmt = formats.of_folder(folder)
        quantized = fmt is not None and fmt is not formats.transformers
        if fmt is formats.transformers:
            try:
                quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                quantized = False
        if not quantized:
            return []
        kind = "bitsandbytes" if fmt is formats.transformers else fmt.NAME
        return [f"{key}: '{folder}' is already quantized ({kind} weights); point it at the full-precision "
                f"folder it was made from, e.g. {self.output_dir}/{self.name}/distill or .../finetune"]

    def _check_output_dir(self) -> list[str]:
        """What `run` would refuse about output_dir, said by `validate` too: a file in the way, a folder that
        cannot be created or written. Permissions do not say it all (root passes them; /proc and /sys refuse new
        folders anyway), so a folder is made in the nearest existing one and removed at once, as `run` makes its
        run folder; nothing is left behind."""
        path = Path(self.output_dir).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return [f"output_dir: cannot write '{path}': '{existing}' is a file; set output_dir to a folder, e.g. "
                    "output_dir=runs"]
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            return [f"output_dir: cannot write '{path}' ('{existing}' is read-only for this user); set output_dir to "
                    "a folder you can write, e.g. output_dir=runs"]
        if existing is not None:
            try:
                Path(tempfile.mkdtemp(prefix=".pipeline-write-test-", dir=existing)).rmdir()
            except OSError as err:
                return [f"output_dir: cannot write '{path}' (a folder cannot be made in '{existing}': "
                        f"{err.strerror or err}); set output_dir to a folder you can write, e.g. output_dir=runs"]
        return []

    def _prune_sizable(self) -> bool:
        """Whether the prune section is valid enough to turn into sizes: when it is not, its own problems are
        reported, and sizes computed from bad settings would only add noise."""
        return not self.prune.check() and set(self.prune.axes) <= set(get_args(prune.Axis))

    def _check_prune(self, source) -> list[str]:
        """Prune targets against the model's config, when it can be read without loading the model."""
        problems = []  # (distill's every/keep/layers/config, which the pruned student makes moot: pipeline.ignored)
        if not self._prune_sizable():
            return problems
        folder = self.prune.input if self.prune.input != "auto" else None
        config = models.peek_config(Source("folder", folder) if folder else source, self.trust_remote_code)
        if config is not None:
            try:
                target = prune.targets(self.prune, config)
            except StageError as err:
                problems += ["prune." + p for p in str(err).removeprefix("prune.").split("; prune.")]
            else:
                problems += self._check_sparsity(surgery.config_for(config, target) if target else config)
            if (surgery.tied(config) and self.prune.target_params is not None and "mlp" not in self.prune.axes
                    and self.prune.round_to != type(self.prune).round_to):  # set, not its default  # (no MLP and no hidden in axes: pipeline.ignored says it)
                problems.append(f"prune.round_to: {self.prune.round_to} has no effect on this model: its attention is "
                                f"as wide as its hidden size ({config.model_type}), so a hidden or heads cut keeps "
                                "whole dimensions of every head, and round_to rounds MLP widths only; add mlp to "
                                "prune.axes, or remove round_to")
        return problems

    def _check_finetune_layers(self, source) -> list[str]:
        """finetune.lora.target_modules name layers of the model it adapts (and its dropout is one they take), and
        finetune.qat's grid fits its layers: checked on the model built from its config on the meta device (no
        weights, no memory), with the run's own messages."""
        ft = self.finetune
        adapter = ft.method != "full" and not ft.lora.check()
        lora_set = adapter and (ft.lora.target_modules or ft.lora.dropout)  # what the model may refuse
        if not ft.enabled or not (lora_set or ft.qat.enabled):
            return []
        folder = ft.input if ft.input != "auto" else None
        config = models.peek_config(Source("folder", folder) if folder else source, self.trust_remote_code)
        if config is None:
            return []
        model = models.meta_model(config, self.trust_remote_code)
        if model is None:
            return []
        problems = []
        if lora_set:
            try:
                lora.dropout(model, ft.lora, lora.targets(model, ft.lora))
            except StageError as err:
                problems.append(str(err))
        if ft.qat.enabled and not ft.qat.check() and (reason := qat.refusal(model, ft.qat)):
            problems.append(f"finetune.qat: {reason}")
        return problems

    def _check_distill(self, source) -> list[str]:
        """distill's layers, student config, cosine term and unfrozen patterns against the teacher's config (and
        the pruned student's, when prune makes it), as the stage checks them after the stages before it ran."""
        d = self.distill
        if not d.enabled:
            return []
        def peek(folder):
            return models.peek_config(Source("folder", folder), self.trust_remote_code)

        student = None
        if d.input != "auto" and ignored.pruned_input(self, d):  # a pruned folder: its teacher is its parent
            if d.teacher == "auto":
                return []
            teacher, student = peek(d.teacher), peek(d.input)
        else:
            folder = d.teacher if d.teacher != "auto" else d.input if d.input != "auto" else None
            teacher = peek(folder) if folder else models.peek_config(source, self.trust_remote_code)
            if teacher is not None and self.prune.enabled and d.input == "auto":
                if not self._prune_sizable():
                    return []
                try:
                    student = surgery.config_for(teacher, prune.targets(self.prune, teacher))
                except StageError:  # _check_prune says it
                    return []
        if teacher is None:
            return []
        return distill.config_problems(d, teacher, self.trust_remote_code, student)

    def _check_chat_template(self, source) -> list[str]:
        """Chat data needs a chat template: the recipe's data.chat_template, or the tokenizer's own (the recipe's
        `tokenizer`, else finetune.input's or the model's), read from its files; else the run would stop at the
        first stage that renders a conversation, after the load stage."""
        if self.data.format != "chat" or self.data.chat_template:
            return []
        ft = self.finetune
        if ft.enabled and ft.input != "auto":
            where = Source("folder", ft.input)
        elif self.tokenizer is not None:
            try:
                where = models.tokenizer_source(self.tokenizer)
            except models.ModelSourceError:  # said above
                return []
        else:
            where = source
        if models.has_chat_template(where) is not False:
            return []
        return [f"data.chat_template: the tokenizer of '{where.label}' has no chat template, and data.format is "
                "chat; set data.chat_template to a Jinja template, e.g. \"{% for m in messages %}{{ m['role'] }}: "
                "{{ m['content'] }}\\n{% endfor %}\", or use a tokenizer that has one"]

    def _check_context(self, source) -> list[str]:
        """Every data config's block_size fits the positions the model was built for: past them GPT-2's position
        table fails inside the forward pass (an IndexError), and a rotary model trains on positions it never saw."""
        config = models.peek_config(source, self.trust_remote_code)
        limit = families.context_length(config) if config is not None else None
        if limit is None:
            return []
        configs = {"data": self.data} | self._stage_data()
        return [f"{key}.block_size: {cfg.block_size} is longer than the model's context ({limit} positions in its "
                f"config); use at most {limit}" for key, cfg in configs.items()
                if cfg is not None and (key == "data" or cfg.block_size != self.data.block_size)
                and cfg.block_size > limit]

    def _check_sparsity(self, config) -> list[str]:
        """An N:M pattern groups M consecutive inputs: every block linear's input width must be a multiple of M."""
        nm = self.prune.sparsity.nm
        if nm is None or not self.prune.sparsity.enabled or self.prune.sparsity.check():
            return []
        s = surgery.sizes(config)
        widths = {"hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
                  "attention width (heads x head_dim)": s["num_attention_heads"] * s["head_dim"]}
        bad = [f"{k} {v}" for k, v in widths.items() if v and v % nm[1]]
        if not bad:
            return []
        return [f"prune.sparsity.pattern: {self.prune.sparsity.pattern} groups {nm[1]} consecutive inputs, but the "
                f"{'pruned ' if self.prune.structured else ''}model's {', '.join(bad)} is not a multiple of {nm[1]}; "
                "use 2:4 (or another M that divides every width), or unstructured"]

    def _check_formats(self, source) -> list[str]:
        """Each candidate against the model it will quantize, when that model's config can be read now: the
        format refuses architectures and shapes its writer (or its readers) cannot handle."""
        chosen = {i: c for i, c in enumerate(self.quantize.candidates) if c.method in quant_backends.BITS}
        if not self.quantize.enabled or not chosen:
            return []
        folder = self.quantize.input if self.quantize.input != "auto" else None
        config = models.peek_config(Source("folder", folder) if folder else source, self.trust_remote_code)
        what = "this model"
        if config is not None and folder is None and self.prune.enabled and self.prune.input == "auto":
            # quantize gets the pruned (and distilled) model: its shapes, not the source's, must fit the format.
            # Where the sizes cannot be worked out (_check_prune says why), the architecture is still checked:
            # every problem at once, not one after the other is fixed
            try:
                if self._prune_sizable():
                    config, what = surgery.config_for(config, prune.targets(self.prune, config)), "the pruned model"
            except StageError:
                pass
        if config is None:
            return []
        problems = []
        for i, cand in chosen.items():
            problem = cand.format.unsupported(config)
            if problem is not None:
                others = sorted({m.split("-")[0] + "-*" for m in quant_backends.BITS} - {cand.method.split("-")[0] + "-*"})
                problems.append(f"quantize.candidates[{i}].method: {cand.method} cannot write {what}: {problem}. "
                                f"Remove the {cand.method.split('-')[0]}-* candidates or use {'/'.join(others)} ones")
        return problems

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


Recipe = make_dataclass(
    "Recipe",
    [(s.name, s.config, field(default_factory=s.config)) for s in SECTIONS]
    + [("push", PushConfig, field(default_factory=PushConfig))],  # publishing to the Hugging Face Hub
    bases=(RecipeSettings,))
Recipe.__module__ = __name__  # (make_dataclass takes `module=` only from Python 3.12)
Recipe.__doc__ = "A parsed recipe: the top-level keys, a section per stage of the stage table, and push."


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise RecipeError([f"override '{text}': write it as section.key=value, e.g. finetune.max_steps=10"],
                          "command line")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError([f"override '{text}': '{key}' is not a key; write it as section.key=value, e.g. "
                           "finetune.max_steps=10"], "command line")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:  # not YAML, e.g. push.repo={user}/my-{stage}: take the text as it is
        return key.strip(), raw


def duplicate_keys(node, prefix: str = "") -> list[str]:
    """Keys given twice in one mapping of a composed YAML document, each named with both lines."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            where = f"{prefix}{name}"
            if name in seen:
                problems.append(f"{where}: given twice (lines {seen[name] + 1} and {key.start_mark.line + 1}); YAML "
                                "would silently keep the last one. Delete one of them")
            seen.setdefault(name, key.start_mark.line)
            problems += duplicate_keys(value, where + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += duplicate_keys(item, f"{prefix.rstrip('.')}[{i}].")
    return problems


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"recipe file '{path}' is a folder; give a recipe's .yaml file, e.g. recipes/quickstart.yaml"],
                          str(path))
    if not path.is_file():
        raise RecipeError([f"recipe file '{path}' does not exist; recipes live in recipes/"], str(path))
    try:
        text = path.read_text(encoding="utf-8")  # YAML is UTF-8 whatever the locale says
    except UnicodeDecodeError as err:
        raise RecipeError([f"not a text file in UTF-8 (byte {err.start} cannot be read): a recipe is YAML text; "
                           "save it as UTF-8"], str(path)) from err
    try:
        duplicated = duplicate_keys(yaml.compose(text))
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        # YAML's own words for a tab ("found character '\t' that cannot start any token") do not say the fix
        mark = getattr(err, "problem_mark", None)
        tab = (f" (line {mark.line + 1} has a tab where YAML takes only spaces: indent with spaces)"
               if "'\\t'" in str(err) and mark is not None else "")
        raise RecipeError([f"not valid YAML{tab}: {err}"], str(path)) from err
    if duplicated:  # YAML lets the last one win without a word: the user meant one of them
        raise RecipeError(duplicated, str(path))
    if not isinstance(raw, dict):
        raise RecipeError(["the recipe must be a mapping of keys (model:, data:, finetune:, ...)"], str(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    given = ignored.given_keys(raw)  # before <stage>.data takes the recipe's data keys: what the user wrote
    if raw.get("name") is None:  # left out or null: the file's name
        raw["name"] = path.stem
    for stage in [s.name for s in SECTIONS if "data" in {f.name for f in fields(s.config)}]:
        section = raw.get(stage)
        if isinstance(section, dict) and isinstance(section.get("data"), dict) and isinstance(raw.get("data", {}), dict):
            # <stage>.data says what differs from the recipe's data; every key it leaves out is the recipe's
            section["data"] = {**(raw.get("data") or {}), **section["data"]}
    errors: list[str] = []
    recipe = parse(Recipe, raw, "", errors)
    errors += ignored.problems(recipe, given, errors)  # keys another key would make the run ignore
    if errors:
        raise RecipeError(errors, str(path))
    return recipe
