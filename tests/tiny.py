"""Tiny real models and a small real tokenizer, built from scratch for tests (no Hub access)."""
from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the stdlib corpus in about a second."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=256)


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def build_spm_tokenizer(prefix: str = "normalizer", add_bos: bool = True, vocab_size: int = 1000):
    """A SentencePiece-style BPE tokenizer as Llama 2, Mistral and Gemma save theirs as fast tokenizers: ids
    0-2 <unk> <s> </s>, 3-258 the <0xXX> byte tokens of byte fallback (in the model's vocabulary, not added
    tokens), then pieces learned within words on the stdlib corpus, spaces written as "▁". `prefix`: how the
    "▁" before the text is put: "normalizer" (Llama 2 / TinyLlama: Prepend + Replace normalizers, also after
    a special token and before a leading space), "metaspace" (Mistral v0.3: a Metaspace pre-tokenizer, scheme
    "first"), "none" (Gemma: no prefix)."""
    import json

    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True)
    learner.train_from_iterator((topics[k] for k in sorted(topics)),
                                trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SPM_SPECIALS)
    replace = normalizers.Replace(" ", space)
    if prefix == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), replace])
    elif prefix == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
    else:
        tok.normalizer = replace
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix != "none" else []))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=256)


def build_model(arch: str, tokenizer, layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=256, vocab_size=len(tokenizer),
                         bos_token_id=eos, eos_token_id=eos)
        return GPT2LMHeadModel(cfg)
    shape = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tokenizer),
                 bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    if arch == "qwen2":  # biases on q/k/v, which a head cut must slice too
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**shape))
    if arch == "mistral":  # untied head
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**{**shape, "tie_word_embeddings": False, "sliding_window": 16}))
    if arch == "qwen3":  # q/k RMSNorm over each head's dimensions
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16))
    if arch in ("gemma", "gemma2", "gemma3"):  # embeddings scaled by sqrt(hidden), (1 + w) norms; Gemma 2/3:
        # four norms a layer, logit soft-capping, sliding-window layers; Gemma 3: q/k norms
        import transformers

        name = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3Text"}[arch]
        config = getattr(transformers, f"{name}Config")(**shape, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                                                        **({"sliding_window": 16} if arch != "gemma" else {}))
        model_class = "Gemma3ForCausalLM" if arch == "gemma3" else f"{name}ForCausalLM"
        return getattr(transformers, model_class)(config)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        from transformers import Phi3Config, Phi3ForCausalLM

        return Phi3ForCausalLM(Phi3Config(**{**shape, "tie_word_embeddings": False}))
    if arch == "phi":  # Phi-1/2: q/k/v/dense and fc1/fc2 with biases, parallel residual, partial rotary, head bias
        from transformers import PhiConfig, PhiForCausalLM

        return PhiForCausalLM(PhiConfig(**{**shape, "tie_word_embeddings": False}, partial_rotary_factor=0.5))
    if arch == "gpt_neox":  # fused query_key_value, parallel residual, partial rotary
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(
            num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            max_position_embeddings=256, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos))
    if arch == "falcon":  # not described in pipeline/families.py: sizes derived (no intermediate_size; head_dim
        # a read-only property)
        from transformers import FalconConfig, FalconForCausalLM

        return FalconForCausalLM(FalconConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4,
                                              vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos))
    if arch == "mixtral":  # not described either: a mixture of experts, fused into 3-D weights in transformers 5
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2))
    if arch in ("olmo", "olmo2"):  # OLMo: weightless LayerNorms; OLMo 2: q/k norms over the whole projection
        import transformers

        name = {"olmo": "Olmo", "olmo2": "Olmo2"}[arch]
        return getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**shape))
    if arch == "llama4":  # not described: experts on every other layer (moe_layers), NoPE and chunked layers
        from transformers import Llama4ForCausalLM, Llama4TextConfig

        return Llama4ForCausalLM(Llama4TextConfig(**{**shape, "tie_word_embeddings": False}, head_dim=16,
                                                  intermediate_size_mlp=128, num_local_experts=2,
                                                  num_experts_per_tok=1, interleave_moe_layer_step=2,
                                                  attention_chunk_size=16))
    if arch == "lfm2":  # not described: convolution and attention layers (layer_types, full_attn_idxs)
        from transformers import Lfm2Config, Lfm2ForCausalLM

        return Lfm2ForCausalLM(Lfm2Config(**{k: v for k, v in shape.items() if k != "intermediate_size"},
                                          intermediate_size=128, full_attn_idxs=[1, 3], block_auto_adjust_ff_dim=False))
    if arch == "granite":  # the Llama layout with scalar multipliers on embeddings, residuals, attention, logits
        from transformers import GraniteConfig, GraniteForCausalLM

        return GraniteForCausalLM(GraniteConfig(**shape, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                attention_multiplier=0.0156, logits_scaling=8.0))
    if arch == "smollm3":  # NoPE layers (no_rope_layers, one entry per layer, read when a layer is built)
        from transformers import SmolLM3Config, SmolLM3ForCausalLM

        return SmolLM3ForCausalLM(SmolLM3Config(**shape, no_rope_layer_interval=2))
    if arch == "qwen3_moe":  # not described: experts on every other layer (decoder_sparse_step), fused 3-D weights
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, decoder_sparse_step=2))
    return LlamaForCausalLM(LlamaConfig(**shape))


def save_vlm(folder: Path, arch: str, tokenizer) -> Path:
    """A tiny vision-language checkpoint: Gemma 3 (gemma3_text inside; transformers' AutoModelForCausalLM loads
    the whole model) or Mistral 3 (a Mistral inside a Pixtral vision tower's model; only the image-text-to-text
    auto class loads it)."""
    import transformers

    torch.manual_seed(0)
    vocab = len(tokenizer)
    text = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if arch == "gemma3":
        config = transformers.Gemma3Config(text_config={**text, "sliding_window": 16}, vision_config=vision,
                                           mm_tokens_per_image=4, image_token_index=vocab - 1,
                                           boi_token_index=vocab - 2, eoi_token_index=vocab - 3)
        model = transformers.Gemma3ForConditionalGeneration(config)
    else:
        config = transformers.Mistral3Config(text_config={**text, "model_type": "mistral"},
                                             vision_config={**vision, "model_type": "pixtral", "head_dim": 16},
                                             image_token_index=vocab - 1)
        model = transformers.Mistral3ForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny(folder: Path, arch: str, tokenizer, layers: int = 4) -> Path:
    model = build_model(arch, tokenizer, layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_text() -> str:
    """The text the load stage checks a source model on for a tiny recipe (its default data: the stdlib corpus's
    validation split with the default seed)."""
    from pipeline import data

    return "\n".join(data.load_splits(data.DataConfig(), 42)["validation"]["text"])


def save_trained(folder: Path, tokenizer, steps: int = 120) -> Path:
    """A one-layer tiny Llama trained on the sample of `check_text()` that the source gate scores: it predicts
    that text well below the bits per byte lzma packs it into (measured: 1.8 against 3.0), as a pretrained
    model does its language, where a random one is worse than lzma (4.3)."""
    from pipeline import source_check

    model = build_model("llama", tokenizer, layers=1)
    ids = torch.tensor(tokenizer(check_text()[: source_check.SAMPLE_CHARS], verbose=False).input_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=g)
        batch = torch.stack([ids[s : s + 128] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_stages(path, stages=None, overrides=()):
    """Load a recipe file and run `stages` of it; (recipe, {stage: output folder})."""
    from pipeline import recipe, runner

    r = recipe.load(path, list(overrides))
    return r, runner.run(r, stages)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def record(folder):
    """A stage folder's pipeline.json."""
    import json

    return json.loads((Path(folder) / "pipeline.json").read_text())


def bench_module(name: str):
    """bench/<name>.py as a module, loaded from its file. Not by putting bench/ first on sys.path: its
    evaluate.py, finetune.py and quantize.py would then shadow the `evaluate` package (and make every later
    `import evaluate` in the test session get the script)."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))  # the scripts' own `import common`, after every installed package
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
