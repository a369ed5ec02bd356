"""Weight sparsity: masks (amount, N:M pattern, Wanda, global), the fixed mask through training and saving, the L1
(proximal) penalty, the bitmask form's bit-exact reload, and the recipe checks."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from pipeline import sparsity
from pipeline.cli import main
from pipeline.context import result_settings
from pipeline.sparsity import SparsitySettings
from pipeline.stages.distill import DistillConfig
from pipeline.stages.prune import PruneConfig

IDS = torch.randint(1, 500, (8, 32), generator=torch.Generator().manual_seed(0))


def _rows(module, in_dim):
    """The weight as [out, in]."""
    w = module.weight.detach()
    return w if in_dim == 1 else w.T


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_masks_zero_the_requested_fraction_of_every_block_weight_and_nothing_else(arch, method,
                                                                                                tokenizer):
    model = tiny.build_model(arch, tokenizer).eval()
    embed = model.get_input_embeddings().weight.detach().clone()
    settings = SparsitySettings(amount=0.6, method=method)
    norms = sparsity.input_norms(model, IDS) if method == "wanda" else None
    sparsity.apply(model, sparsity.masks(model, settings, norms))
    linears = sparsity.block_linears(model)
    assert len(linears) == 4 * (4 if arch == "gpt2" else 7)  # c_attn, c_proj, c_fc, mlp.c_proj / q,k,v,o,gate,up,down
    for name, (module, in_dim) in linears.items():
        w = _rows(module, in_dim)
        if method == "wanda":  # compared within each output row: every row loses the same number
            assert ((w == 0).sum(1) == round(0.6 * w.shape[1])).all(), name
        else:
            assert int((w == 0).sum()) == round(0.6 * w.numel()), name
    assert sparsity.measure(model)["sparsity"] == pytest.approx(0.6, abs=0.005)
    assert torch.equal(model.get_input_embeddings().weight, embed)  # embeddings (and the tied head) stay dense


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pattern,kept", [("2:4", 2), ("1:4", 1), ("4:8", 4)])
def test_nm_masks_keep_exactly_n_of_every_m_inputs(arch, pattern, kept, tokenizer):
    model = tiny.build_model(arch, tokenizer).eval()
    settings = SparsitySettings(pattern=pattern, method="wanda")
    sparsity.apply(model, sparsity.masks(model, settings, sparsity.input_norms(model, IDS)))
    m = int(pattern.split(":")[1])
    for name, (module, in_dim) in sparsity.block_linears(model).items():
        w = _rows(module, in_dim)  # groups run along the input dimension (Conv1D's dim 0, Linear's dim 1)
        per_group = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (per_group == kept).all(), name
    assert sparsity.check_pattern(model, (kept, m))
    assert sparsity.measure(model)["sparsity"] == pytest.approx(1 - kept / m, abs=1e-4)
    assert settings.target == 1 - kept / m


def test_nm_pattern_check_catches_a_group_with_too_many_weights(tokenizer):
    model = tiny.build_model("llama", tokenizer).eval()
    sparsity.apply(model, sparsity.masks(model, SparsitySettings(pattern="2:4", method="magnitude")))
    assert sparsity.check_pattern(model, (2, 4))
    module, _ = next(iter(sparsity.block_linears(model).values()))
    with torch.no_grad():
        module.weight[0, :4] = 1.0  # a dense group
    assert not sparsity.check_pattern(model, (2, 4))


def test_wanda_keeps_the_weights_of_a_strongly_active_input_even_when_they_are_small(tokenizer):
    model = tiny.build_model("llama", tokenizer).eval()
    name, (module, _) = next(iter(sparsity.block_linears(model).items()))
    with torch.no_grad():
        module.weight[:, 5] *= 1e-3  # input channel 5: the smallest weights, which magnitude drops
    norms = {n: torch.ones(m.weight.shape[1], dtype=torch.float64) for n, (m, _) in sparsity.block_linears(model).items()}
    norms[name][5] = 1e6  # ... but the largest activations, which Wanda weighs in
    wanda = sparsity.masks(model, SparsitySettings(amount=0.5, method="wanda"), norms)[name]
    magnitude = sparsity.masks(model, SparsitySettings(amount=0.5, method="magnitude"))[name]
    assert wanda[:, 5].all() and not magnitude[:, 5].any()


def test_global_scope_zeros_the_fraction_over_all_layers_together(tokenizer):
    model = tiny.build_model("gpt2", tokenizer).eval()
    with torch.no_grad():  # one layer of much smaller weights: a global threshold takes most of it
        sparsity.block_linears(model)["transformer.h.0.mlp.c_fc"][0].weight.mul_(0.1)
    sparsity.apply(model, sparsity.masks(model, SparsitySettings(amount=0.5, method="magnitude", scope="global")))
    got = sparsity.measure(model)
    assert got["zeros"] == round(0.5 * got["weights"])
    assert got["layers"]["transformer.h.0.mlp.c_fc"] > 0.9 and min(got["layers"].values()) < 0.5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bitmask_form_reloads_bit_exactly_and_is_smaller(arch, tokenizer, tmp_path):
    model = tiny.build_model(arch, tokenizer).eval()
    sparsity.apply(model, sparsity.masks(model, SparsitySettings(amount=0.7, method="magnitude")))
    with torch.no_grad():  # a negative zero is a value the form must keep, bit for bit
        next(iter(sparsity.block_linears(model).values()))[0].weight[0, 0] = -0.0
    sparsity.save_bitmask(model, tokenizer, tmp_path / "c")
    back = sparsity.load_bitmask(tmp_path / "c")
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key].contiguous(), theirs[key].contiguous()
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32)), key
    assert torch.equal(tiny.logits(model, IDS), tiny.logits(back, IDS))
    sizes = sparsity.forms(model)
    assert sizes["bitmask"] < 0.5 * sizes["dense"] + 0.5 * sizes["dense"] * 0.3  # bits + 30% of the block values
    assert sizes["bitmask_int8"] < sizes["dense_int8"]
    assert sizes[f"bitmask_int8_{sizes['codec']}"] < sizes[f"dense_int8_{sizes['codec']}"]
    for form in ("dense", "bitmask"):  # no coder of these symbols beats the order-0 bound: the codec does not
        assert sizes[f"{form}_int8_bound"] < sizes[f"{form}_int8_{sizes['codec']}"]


def test_the_entropy_bound_counts_value_histograms_and_mask_patterns_by_hand():
    import math

    values = torch.tensor([0, 0, 0, 0, 5, 5, -3, 7], dtype=torch.int8)  # frequencies 1/2, 1/4, 1/8, 1/8
    scale = torch.ones(2)
    two_four = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    form = {"v": values, "v.scale": scale, "w.bitmask": sparsity._pack(two_four), "w.shape": torch.tensor([1, 24])}
    bits = (4 * 1 + 2 * 2 + 2 * 3) + 6 * math.log2(6)  # the values' histogram; six 2-of-4 patterns, each once
    assert sparsity.entropy_bound(form) == math.ceil(bits / 8) + 4 * 2 + 8 * 2  # scales and shape as stored
    assert sparsity.entropy_bound({"w.bitmask": sparsity._pack(torch.ones(1, 8, dtype=torch.bool)),
                                   "w.shape": torch.tensor([1, 8])}) == 16  # one pattern: the mask costs nothing


def test_keep_mask_callback_rezeros_after_a_step_and_l1_makes_exact_zeros(tokenizer):
    model = tiny.build_model("llama", tokenizer)
    sparsity.apply(model, sparsity.masks(model, SparsitySettings(amount=0.5, method="magnitude")))
    keep = sparsity.from_zeros(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert sparsity.measure(model)["sparsity"] < 0.1  # Adam moved every weight
    callback = sparsity.KeepMask(model, keep, l1=0.0)
    callback.on_optimizer_step(None, None, None, optimizer=opt)
    assert sparsity.from_zeros(model).keys() == keep.keys()
    for name, (module, _) in sparsity.block_linears(model).items():
        assert (module.weight[~keep[name]] == 0).all(), name
    before = sparsity.measure(model)["sparsity"]
    sparsity.KeepMask(model, None, l1=1.0).on_optimizer_step(None, None, None, optimizer=opt)  # threshold 1e-2
    assert sparsity.measure(model)["sparsity"] > before + 0.05


def test_sparse_prune_then_distill_keeps_the_mask_through_training_and_saving(tiny_models, make_recipe, tmp_path):
    path = make_recipe(tiny_models["llama"], finetune={"enabled": False}, quantize={"enabled": False},
                       prune={"enabled": True, "calibration_blocks": 8,
                              "sparsity": {"amount": 0.5, "method": "wanda"}},
                       evaluate={"models": ["base", "prune", "distill"], "speed": False})
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    rec = tiny.record(run_dir / "prune")
    assert rec["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01) and rec["metrics"]["sparsity"] == rec["sparsity"]["sparsity"]
    assert len(rec["sparsity"]["layers"]) == 28 and all(v == pytest.approx(0.5, abs=0.02)
                                                        for v in rec["sparsity"]["layers"].values())
    assert rec["importance"] is None and rec["sizes"]["before"] == rec["sizes"]["after"]
    assert {"dense", "bitmask", "bitmask_int8"} <= set(rec["sparsity"]["forms"])
    assert "Wanda" in rec["summary"] and "sparse" in rec["tags"]
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "prune")
    distilled = AutoModelForCausalLM.from_pretrained(run_dir / "distill")
    masks = sparsity.from_zeros(pruned)
    moved = False
    for name, (module, _) in sparsity.block_linears(distilled).items():
        assert (module.weight[~masks[name]] == 0).all(), name  # the masked weights are still exactly zero
        moved |= not torch.equal(module.weight, sparsity.block_linears(pruned)[name][0].weight)
    assert moved  # and the rest trained
    d = tiny.record(run_dir / "distill")
    assert d["sparsity"]["mask"] == "fixed" and d["sparsity"]["sparsity"] >= rec["sparsity"]["sparsity"]
    assert d["metrics"]["train_loss_last"] < d["metrics"]["train_loss_first"]
    # the compressed form of the trained model reloads bit-exactly: same weights, same logits
    back = sparsity.load_bitmask(run_dir / "distill" / sparsity.COMPRESSED_DIR)
    for key, t in distilled.state_dict().items():
        assert torch.equal(t, back.state_dict()[key]), key
    assert torch.equal(tiny.logits(distilled.eval(), IDS), tiny.logits(back, IDS))
    assert d["sparsity"]["forms"]["bitmask_file"] < 0.8 * (run_dir / "distill" / "model.safetensors").stat().st_size
    # the report: a zeros column for the sparse models (none for the dense base), and what the zeros buy
    report = (run_dir / "report.md").read_text()
    lines = report.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    table = [line for line in lines[first:lines.index("", first)] if line.startswith("| ")]  # the main table
    column = table[0].split(" | ").index("zeros")
    cells = {row.split(" | ")[0].strip("| "): row.split(" | ")[column] for row in table[1:]}
    assert cells["base"] == "–" and cells["prune"] == "50%" and cells["distill"] == "50%", cells
    assert "Sparsity saves disk, not time" in report and "`distill` (unstructured, wanda): dense" in report


def test_two_four_prune_stage_writes_the_pattern_and_distill_keeps_it(tiny_models, make_recipe, tmp_path):
    path = make_recipe(tiny_models["gpt2"], finetune={"enabled": False}, quantize={"enabled": False},
                       evaluate={"enabled": False}, distill={"max_steps": 4},
                       prune={"enabled": True, "calibration_blocks": 4,
                              "sparsity": {"pattern": "2:4", "write_compressed": False}})
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "prune" / sparsity.COMPRESSED_DIR).exists()
    for stage in ("prune", "distill"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
        assert sparsity.check_pattern(model, (2, 4)), stage
        assert sparsity.measure(model)["sparsity"] >= 0.5


def test_l1_penalty_raises_measured_sparsity_in_fine_tuning(tiny_models, make_recipe, tmp_path):
    got = {}
    for l1 in (0.0, 0.5):
        path = make_recipe(tiny_models["gpt2"], name=f"l1-{l1}", finetune={"l1": l1}, distill={"enabled": False},
                           quantize={"enabled": False}, evaluate={"enabled": False})
        assert main(["run", str(path)]) == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / f"l1-{l1}" / "finetune")
        got[l1] = sparsity.measure(model)["sparsity"]
        rec = tiny.record(tmp_path / "runs" / f"l1-{l1}" / "finetune")
        assert (rec["sparsity"] is None) == (l1 == 0)
    assert got[0.0] < 0.01 and got[0.5] > 0.2
    assert rec["sparsity"]["sparsity"] == pytest.approx(got[0.5], abs=1e-4) and rec["sparsity"]["l1"] == 0.5


def test_new_keys_leave_the_fingerprint_of_older_runs_alone():
    assert "sparsity" not in result_settings(PruneConfig()) and "l1" not in result_settings(DistillConfig())
    assert result_settings(PruneConfig(sparsity=SparsitySettings(amount=0.5)))["sparsity"]["amount"] == 0.5
    assert result_settings(DistillConfig(l1=0.1))["l1"] == 0.1


@pytest.mark.parametrize("prune_keys,other,needle", [
    ({"sparsity": {"amount": 1.0}}, {}, "prune.sparsity.amount: 1.0 must be a fraction of zeros in [0, 1)"),
    ({"sparsity": {"amount": -0.2}}, {}, "prune.sparsity.amount: -0.2 must be a fraction"),
    ({"sparsity": {"pattern": "4:2"}}, {}, "prune.sparsity.pattern: 4:2 must keep N of M weights with 0 < N < M"),
    ({"sparsity": {"pattern": "2-4"}}, {}, "prune.sparsity.pattern: '2-4' is not allowed"),
    ({"sparsity": {"pattern": "2:4", "amount": 0.3}}, {}, "prune.sparsity.amount: 0.3 contradicts pattern 2:4"),
    ({"sparsity": {"pattern": "2:4", "scope": "global"}}, {}, "prune.sparsity.scope: global ranks all layers"),
    ({"sparsity": {"pattern": "3:7"}}, {}, "prune.sparsity.pattern: 3:7 groups 7 consecutive inputs"),
    ({"sparsity": {"method": "obs", "amount": 0.5}}, {}, "prune.sparsity.method: 'obs' is not allowed"),
    ({"sparsity": {"method": "sparsegpt", "amount": 0.5, "scope": "global"}}, {},
     "prune.sparsity.scope: global ranks all layers together, but sparsegpt prunes"),
    ({"sparsity": {"amount": 0.5}}, {"finetune": {"method": "lora", "l1": 0.1}},
     "finetune.l1: the L1 penalty shrinks the full weights"),
    ({"sparsity": {"amount": 0.5}}, {"distill": {"l1": -1}}, "distill.l1: -1.0 must be 0 (off) or positive"),
])
def test_bad_sparsity_settings_fail_at_validation(prune_keys, other, needle, tiny_models, make_recipe, capsys):
    path = make_recipe(tiny_models["llama"], prune={"enabled": True, **prune_keys}, **other)
    assert main(["validate", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_sparsity_alone_is_a_valid_prune_section_and_an_unquoted_pattern_is_read_as_written(tiny_models,
                                                                                             make_recipe):
    assert main(["validate", str(make_recipe(tiny_models["llama"], prune={"enabled": True,
                                                                             "sparsity": {"pattern": "2:4"}}))]) == 0
    from pipeline import recipe

    path = make_recipe(tiny_models["llama"], prune={"enabled": True})
    r = recipe.load(path, ["prune.sparsity.pattern=2:4"])  # YAML 1.1 reads an unquoted 2:4 as 124
    assert r.prune.sparsity.pattern == "2:4" and r.prune.sparsity.nm == (2, 4)
    assert SparsitySettings(pattern=4 * 60 + 8).nm == (4, 8)


def test_lora_on_a_sparse_folder_is_refused(tiny_models, make_recipe, tmp_path, capsys):
    path = make_recipe(tiny_models["gpt2"], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={"enabled": False}, evaluate={"enabled": False},
                       prune={"enabled": True,  # (magnitude sparsity alone reads no calibration_blocks)
                              "sparsity": {"amount": 0.5, "method": "magnitude", "write_compressed": False}})
    assert main(["run", str(path)]) == 0
    sparse = tmp_path / "runs" / "tiny" / "prune"
    again = make_recipe(tiny_models["gpt2"], name="again", finetune={"method": "lora", "input": str(sparse)})
    assert main(["validate", str(again)]) == 2
    assert "would fill its zeros; use method: full" in capsys.readouterr().err


def test_a_sparse_model_is_quantized_like_any_other_and_its_int8_weights_keep_the_zeros(tiny_models, make_recipe,
                                                                                       tmp_path):
    from safetensors.torch import load_file

    path = make_recipe(tiny_models["llama"], finetune={"enabled": False}, distill={"enabled": False},
                       evaluate={"enabled": False},
                       prune={"enabled": True, "calibration_blocks": 2, "sparsity": {"amount": 0.5}},
                       quantize={"candidates": [{"method": "bnb-int8"}], "max_ppl_increase": 50.0})
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert tiny.record(run_dir / "quantize")["parent"] == str(run_dir / "prune")
    weights = load_file(str(next((run_dir / "quantize").glob("*.safetensors"))))
    block = {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}
    assert len(block) == 28 and all(v.dtype == torch.int8 for v in block.values())
    # absmax int8 maps 0 to 0: the quantized model holds the mask too (bitsandbytes' outlier columns aside)
    assert all((v == 0).float().mean() >= 0.5 for v in block.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pattern,amount", [("unstructured", 0.5), ("2:4", 0.0)])
def test_sparsegpt_masks_have_the_requested_sparsity_and_pattern(arch, pattern, amount, tokenizer):
    model = tiny.build_model(arch, tokenizer).eval()
    embed = model.get_input_embeddings().weight.detach().clone()
    settings = SparsitySettings(amount=amount, pattern=pattern, method="sparsegpt")
    keep = sparsity.sparsegpt(model, settings, IDS, batch_size=4)
    linears = sparsity.block_linears(model)
    assert set(keep) == set(linears)
    for name, (module, in_dim) in linears.items():
        w = _rows(module, in_dim)
        assert torch.equal(keep[name], module.weight.detach() != 0), name  # the mask is the weight's zeros
        if pattern == "2:4":
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
        else:  # each layer's zeros are exact: the blocks' shares of them are rounded to add up
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    assert sparsity.measure(model)["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert torch.equal(model.get_input_embeddings().weight, embed)


def _layer_output_errors(model, ids, dense_weights) -> float:
    """Sum over the block linears of ||(W - W_dense) X||^2 / ||W_dense X||^2 on the dense model's inputs X."""
    inputs = {}
    linears = sparsity.block_linears(model)

    def keep_input(name):
        def hook(mod, args):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, (m, _) in linears.items()]
    current = {n: m.weight.detach().clone() for n, (m, _) in linears.items()}
    with torch.no_grad():
        for n, (m, _) in linears.items():
            m.weight.copy_(dense_weights[n])
        model(input_ids=ids)
        for n, (m, _) in linears.items():
            m.weight.copy_(current[n])
    for h in hooks:
        h.remove()
    total = 0.0
    for n, (m, in_dim) in linears.items():
        x = inputs[n]
        w, w0 = _rows(m, in_dim), (dense_weights[n] if in_dim == 1 else dense_weights[n].T)
        total += float(((x @ (w - w0).T) ** 2).sum() / (x @ w0.T).pow(2).sum())
    return total


@pytest.mark.parametrize("pattern,amount", [("unstructured", 0.5), ("2:4", 0.0)])
def test_sparsegpt_reconstructs_layer_outputs_better_than_magnitude_on_a_trained_model(pattern, amount,
                                                                                        trained_llama):
    """The point of SparseGPT: at the same sparsity its re-fitted weights reproduce each layer's output on the
    calibration text more closely than magnitude pruning's (and its logits follow the dense model's better)."""
    from pipeline.source_check import SAMPLE_CHARS

    tok = tiny.build_tokenizer()
    ids = torch.tensor(tok(tiny.check_text()[:SAMPLE_CHARS], verbose=False).input_ids)
    blocks = ids[: (len(ids) // 64) * 64].reshape(-1, 64)[:16]
    errors, kl = {}, {}
    dense_logits = None
    for method in ("magnitude", "sparsegpt"):
        model = AutoModelForCausalLM.from_pretrained(trained_llama, dtype=torch.float32).eval()
        dense = {n: m.weight.detach().clone() for n, (m, _) in sparsity.block_linears(model).items()}
        with torch.no_grad():
            dense_logits = model(input_ids=blocks).logits
        settings = SparsitySettings(amount=amount, pattern=pattern, method=method)
        if method == "sparsegpt":
            sparsity.sparsegpt(model, settings, blocks, batch_size=8)
        else:
            sparsity.apply(model, sparsity.masks(model, settings))
        assert sparsity.measure(model)["sparsity"] == pytest.approx(0.5, abs=0.005)
        errors[method] = _layer_output_errors(model, blocks, dense)
        with torch.no_grad():
            logp = model(input_ids=blocks).logits.log_softmax(-1)
        kl[method] = float(torch.nn.functional.kl_div(logp, dense_logits.log_softmax(-1), log_target=True,
                                                      reduction="batchmean"))
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert kl["sparsegpt"] < kl["magnitude"], kl

