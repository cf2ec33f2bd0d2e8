import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fmoe
from fmoe.model.compat import width_field
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches


def pruned(family, scope):
    model = tiny_model(family)
    plan = fmoe.make_plan(fmoe.score(model, make_batches(n_batches=2)), 0.5, scope, multiple_of=16 if scope == "expert" else 1)
    return fmoe.prune(model, plan)


def run(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_loads_with_stock_transformers(family, tmp_path):
    model = pruned(family, "expert")
    ids = torch.randint(3, 128, (2, 10))
    fmoe.save_pretrained(model, tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin"))
    loaded = fmoe.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(run(loaded, ids), run(model, ids), rtol=0, atol=0)
    if width_field(family) is not None:
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(run(stock, ids), run(model, ids), rtol=1e-5, atol=1e-6)
        assert getattr(stock.config, width_field(family)) == 16
    else:  # shared experts are sized from the routed width field: only fmoe's loader describes this model
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        assert config["fmoe_format"] == "fused" and config["moe_intermediate_size"] == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_export_roundtrips_bit_exactly(family, tmp_path):
    model = pruned(family, "layer")
    assert any(isinstance(m, fmoe.RaggedExperts) for m in fmoe.find_experts(model).values())
    fmoe.save_pretrained(model, tmp_path / "m")
    loaded = fmoe.from_pretrained(tmp_path / "m")
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.randint(3, 128, (2, 10))
    assert torch.equal(run(loaded, ids), run(model, ids))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["fmoe_expert_widths"] == {n: fmoe.model.experts.expert_widths(m) for n, m in fmoe.find_experts(model).items()}


def test_failed_save_leaves_previous_checkpoint_and_no_temp_dir(tmp_path):
    model = pruned("olmoe", "layer")
    fmoe.save_pretrained(model, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())

    class Broken:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fmoe.save_pretrained(model, tmp_path / "m", tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    with pytest.raises(ValueError, match="missing|unexpected"):
        (tmp_path / "x").mkdir()
        fmoe.save_pretrained(pruned("olmoe", "expert"), tmp_path / "x")
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "model.safetensors").replace(tmp_path / "m" / "keep.safetensors")
        (tmp_path / "x" / "model.safetensors").replace(tmp_path / "m" / "model.safetensors")
        assert cfg["fmoe_format"] == "fused"
        fmoe.from_pretrained(tmp_path / "m")


def test_loading_a_non_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fmoe.from_pretrained(tmp_path)


def test_fused_format_roundtrips_unpruned_models_and_dtype(tmp_path):
    unpruned = tiny_model("deepseek_v2")  # shared experts tied to the routed width: always the fused format
    fmoe.save_pretrained(unpruned, tmp_path / "a")
    ids = torch.randint(3, 128, (1, 8))
    assert torch.equal(run(fmoe.from_pretrained(tmp_path / "a"), ids), run(unpruned, ids))
    ragged = pruned("qwen3_moe", "layer").to(torch.bfloat16)
    fmoe.save_pretrained(ragged, tmp_path / "b")
    loaded = fmoe.from_pretrained(tmp_path / "b")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    expected, got = ragged.state_dict(), loaded.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # weights bit-exact in bf16
    torch.testing.assert_close(run(loaded, ids), run(ragged, ids), rtol=2e-2, atol=2e-2)  # kernels may differ


def test_unaligned_uniform_export_runs_after_loading(tmp_path):
    model = tiny_model("mixtral")
    plan = fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.6, "expert", multiple_of=1)
    with pytest.warns(UserWarning, match="batched_mm"):
        fmoe.prune(model, plan)
    fmoe.save_pretrained(model, tmp_path / "m")
    ids = torch.randint(3, 128, (1, 8))
    with pytest.warns(UserWarning, match="batched_mm"):
        loaded = fmoe.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(run(loaded, ids), run(model, ids))


@pytest.mark.parametrize("scope", ["expert", "layer"])  # stock and fused formats
def test_truncated_weights_are_a_clear_error_naming_the_file(tmp_path, scope):
    fmoe.save_pretrained(pruned("qwen3_moe", scope), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors.*truncated or corrupt"):
        fmoe.from_pretrained(tmp_path / "m")


def test_wrong_module_names_in_the_widths_field_are_a_clear_error(tmp_path):
    fmoe.save_pretrained(pruned("olmoe", "layer"), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    widths = config["fmoe_expert_widths"]
    config["fmoe_expert_widths"] = {name.replace("layers", "blocks"): ws for name, ws in widths.items()}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: fmoe_expert_widths names .*'model\.blocks\.0\.mlp\.experts'"):
        fmoe.from_pretrained(tmp_path / "m")
    first = next(iter(widths))
    for wrong in (widths[first][:-1], [64] + widths[first][1:]):  # an expert missing, a width over the full one
        config["fmoe_expert_widths"] = {**widths, first: wrong}
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"widths that do not fit \['{first}'\]"):
            fmoe.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("scope", ["expert", "layer"])
def test_saving_leaves_the_callers_config_unchanged(tmp_path, scope):
    model = pruned("qwen3_moe", scope).to(torch.bfloat16)
    before = model.config.to_dict()
    fmoe.save_pretrained(model, tmp_path / "m")
    assert model.config.to_dict() == before
    assert json.loads((tmp_path / "m" / "config.json").read_text())["fmoe_format"] in ("stock", "fused")


def test_replacing_a_checkpoint_keeps_a_whole_one_at_the_path_at_every_instant(tmp_path, monkeypatch):
    """Every rename the swap makes is watched: after each one, the path holds a complete checkpoint."""
    import os

    import fmoe.io

    path = tmp_path / "m"
    fmoe.save_pretrained(pruned("olmoe", "expert"), path)
    states = []

    def watched(rename):
        def call(*args, **kwargs):
            result = rename(*args, **kwargs)
            states.append(json.loads((path / "config.json").read_text())["fmoe_format"]
                          if (path / "config.json").is_file() and (path / "model.safetensors").is_file() else None)
            return result
        return call

    monkeypatch.setattr(fmoe.io.os, "replace", watched(os.replace))
    monkeypatch.setattr(fmoe.io, "exchange", watched(fmoe.io.exchange))
    fmoe.save_pretrained(pruned("olmoe", "layer"), path)
    assert states and None not in states  # never a moment without a checkpoint
    assert states[-1] == "fused"  # the new one (ragged) is in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
