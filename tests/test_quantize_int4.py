"""Data-aware OpenVINO int4 (NNCF AWQ / scale estimation / GPTQ / LoRA correction / mixed precision):
the options reach nncf, the calibration blocks come from the training split, refusals come at validation."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pipeline import data, formats, recipe
from pipeline import quant_backends as qb
from pipeline.cli import main
from tiny import record as _record

GATE = {"context": 64, "stride": 32, "max_tokens": 512, "speed_tokens": 0}


def _rt_info(folder) -> dict:
    """What nncf wrote into the IR it compressed (rt_info['nncf']['weight_compression'])."""
    import openvino as ov

    info = ov.Core().read_model(str(folder / "openvino_model.xml")).get_rt_info()
    return {k: str(v.value) for k, v in info["nncf"]["weight_compression"].items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_data_aware_int4_options_reach_nncf_and_calibrate_on_the_training_split(arch, tiny_models, make_recipe,
                                                                                  monkeypatch):
    drawn = []  # every calibration draw, to check which split it came from
    original = data.calibration_blocks

    def spy(cfg, tokenizer, seed, n, key, block_size=None):
        blocks = original(cfg, tokenizer, seed, n, key, block_size)
        drawn.append(blocks)
        return blocks

    monkeypatch.setattr(data, "calibration_blocks", spy)
    candidates = [
        {"method": "openvino-int4", "name": "int4-rtn", "group_size": 32},
        {"method": "openvino-int4", "name": "int4-awq-se", "group_size": 32, "awq": True, "scale_estimation": True,
         "calibration_samples": 8, "calibration_tokens": 32},
        {"method": "openvino-int4", "name": "int4-gptq", "group_size": 32, "gptq": True,
         "calibration_samples": 8, "calibration_tokens": 32},  # same calibration set: collected once
        {"method": "openvino-int4", "name": "int4-mix", "group_size": 32, "ratio": 0.5,
         "sensitivity_metric": "mean_activation_magnitude", "backup_precision": "int8_sym",
         "calibration_samples": 4},
    ]
    path = make_recipe(tiny_models[arch], finetune={"enabled": False}, distill={"enabled": False},
                       quantize={**GATE, "candidates": candidates, "max_ppl_increase": 1e6, "prefer": "quality"},
                       evaluate={"enabled": False})
    assert main(["run", str(path)]) == 0
    r = recipe.load(path)
    rec = _record(r.run_dir / "quantize")
    rows = {row["name"]: row for row in rec["candidates"]}
    assert all(row["status"] in ("passed", "over budget") for row in rows.values()), rows
    assert "calibration" not in rows["int4-rtn"]
    assert rows["int4-awq-se"]["calibration"] == {"split": "train", "sequences": 8, "tokens_each": 32}
    assert rows["int4-mix"]["calibration"] == {"split": "train", "sequences": 4, "tokens_each": 64}
    assert rows["int4-awq-se"]["options"]["awq"] is True and "AWQ, scale estimation" in rows["int4-awq-se"]["description"]
    # Two distinct calibration shapes, each drawn once, both from the training split only.
    assert [tuple(b.shape) for b in drawn] == [(8, 32), (4, 64)]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(r.run_dir / "base")
    splits = data.prepare(r.data, tok, r.seed)
    train_stream = data.eval_stream(splits["train"])
    valid_stream = data.eval_stream(splits["validation"])
    for blocks in drawn:
        for block in blocks.tolist():  # every block is a run of training tokens, none of validation tokens
            assert _contains(train_stream, block) and not _contains(valid_stream, block)
    # The winner folder's IR says what nncf applied.
    chosen = rec["chosen"]
    info = _rt_info(r.run_dir / "quantize")
    expected = {"int4-rtn": {"awq": "False", "scale_estimation": "False", "gptq": "False"},
                "int4-awq-se": {"awq": "True", "scale_estimation": "True"},
                "int4-gptq": {"gptq": "True"},
                "int4-mix": {"ratio": "0.5", "sensitivity_metric": "mean_activation_magnitude",
                             "backup_mode": "int8_sym"}}[chosen]
    assert {k: info[k] for k in expected} == expected, info
    config = json.loads((r.run_dir / "quantize" / "openvino_config.json").read_text())["quantization_config"]
    assert config["bits"] == 4


def _contains(stream: list[int], block: list[int]) -> bool:
    """Whether `block` occurs as a contiguous run in `stream`."""
    n = len(block)
    first = block[0]
    return any(stream[i:i + n] == block for i, t in enumerate(stream[: len(stream) - n + 1]) if t == first)


def test_each_data_aware_option_reaches_nncf(tiny_models, tmp_path):
    """Candidate by candidate on tiny Llama: what the IR records equals what the recipe asked for."""
    import datasets  # noqa: F401 (optimum-intel builds the calibration set with it)


    source = tiny_models["llama"]
    ids = torch.randint(3, 500, (64, 64), generator=torch.Generator().manual_seed(0))
    calib = qb.Calibration(tmp_path, lambda n, t: ids[:n, :t], 64)
    for i, (cand, expected) in enumerate([
        (qb.Candidate("openvino-int4", group_size=32, scale_estimation=True, calibration_samples=4),
         {"scale_estimation": "True", "awq": "False"}),
        (qb.Candidate("openvino-int4", group_size=32, lora_correction=True, calibration_samples=4),
         {"lora_correction": "True"}),
        (qb.Candidate("openvino-int4", group_size=32, sym=True, awq=True, calibration_samples=4),
         {"awq": "True", "mode": "int4_sym"}),
    ]):
        assert cand.check() == []
        model = qb.quantize(cand, source, torch.device("cpu"), calibration=calib)
        out = tmp_path / f"c{i}"
        qb.save(model, out, cand, AutoTokenizer.from_pretrained(source))  # as the quantize stage does
        info = _rt_info(out)
        assert {k: info[k] for k in expected} == expected, (cand, info)
        reloaded, _ = formats.load_folder(out)
        assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()
    assert (tmp_path / "nncf-statistics-4x64").is_dir()  # one statistics cache, shared by the three


@pytest.mark.parametrize("candidate, message", [
    ({"method": "openvino-int4", "gptq": True, "lora_correction": True}, "gptq and lora_correction"),
    ({"method": "openvino-int8", "all_layers": True}, "all_layers: does not apply to openvino-int8"),
    ({"method": "openvino-int8", "awq": True}, "awq: does not apply to openvino-int8"),
    ({"method": "openvino-int8", "scale_estimation": True}, "scale_estimation: does not apply to openvino-int8"),
    ({"method": "bnb-nf4", "calibration_samples": 16}, "calibration_samples: does not apply to bnb-nf4"),
    ({"method": "openvino-int4", "sensitivity_metric": "hessian_input_activation"}, "only ranks layers"),
    ({"method": "openvino-int4", "ratio": 0.8, "sensitivity_metric": "bogus"}, "sensitivity_metric"),
    ({"method": "openvino-int4", "backup_precision": "int2"}, "backup_precision"),
    ({"method": "openvino-int4", "calibration_samples": 0}, "calibration_samples: 0 must be at least 1"),
])
def test_refused_combinations_fail_at_validation(candidate, message, tiny_models, make_recipe, capsys, tmp_path):
    path = make_recipe(tiny_models["gpt2"], quantize={"candidates": [candidate]})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "quantize.candidates[0]" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before any stage ran


def _weight_types(folder: Path) -> dict[tuple[int, ...], set[str]]:
    """Element types of the IR's constant weights, by shape."""
    import openvino as ov

    types: dict[tuple[int, ...], set[str]] = {}
    for op in ov.Core().read_model(folder / "openvino_model.xml").get_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) >= 2:
            shape = tuple(d.get_length() for d in op.get_output_partial_shape(0))
            types.setdefault(shape, set()).add(op.get_output_element_type(0).get_type_name())
    return types


def test_all_layers_puts_the_embedding_in_4_bit(tiny_models, tmp_path):
    """all_layers: the embedding (tied head) is 4-bit too, so the file is smaller; without it the embedding stays
    8-bit (NNCF's default, the size floor of a small model with a large vocabulary)."""
    source = tiny_models["llama"]
    vocab, hidden = AutoConfig.from_pretrained(source).vocab_size, AutoConfig.from_pretrained(source).hidden_size
    sizes, embedding = {}, {}
    for all_layers in (False, True):
        cand = qb.Candidate("openvino-int4", group_size=32, all_layers=all_layers)
        assert cand.check() == []
        out = tmp_path / f"all-{all_layers}"
        qb.save(qb.quantize(cand, source, torch.device("cpu")), out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        types = _weight_types(out)
        # group-wise int4 stores [rows, groups, group] (NNCF); per-channel int8 stores [rows, columns]
        embedding[all_layers] = set().union(*(t for s, t in types.items() if s[0] == vocab and s[-1] in (hidden, 32)
                                              and len(s) in (2, 3)))
        sizes[all_layers] = (out / "openvino_model.bin").stat().st_size
        reloaded, _ = formats.load_folder(out)
        assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()
    assert embedding[False] & {"u8", "i8"} and not embedding[False] & {"u4", "i4"}, embedding
    assert embedding[True] & {"u4", "i4"}, embedding
    assert sizes[True] < sizes[False], sizes
