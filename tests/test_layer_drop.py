import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fmoe
from fmoe.model.checkpoint import empty_model
from fmoe.model.layers import decoder_layers, moe_layers
from fmoe.model.structure import EXPERT_COUNTS_FIELD
from fmoe.model.experts import expert_widths
from fmoe.model.structure import DROPPED_MOE_FIELD
from fmoe.methods.layer_drop import DropPlan, drop, drop_blocks, drop_moe_sublayers, plan_block_drop, plan_layer_drop
from fmoe.model.structure import WIDTHS_FIELD
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches

# 4 decoder layers each; the config quirks a block drop must rewrite, and the blocks dropped
BLOCK_CASES = {
    "gpt_oss": (dict(sliding_window=4), [1]),  # sliding/full alternate: kept types become sliding, sliding, full
    "deepseek_v3": (dict(first_k_dense_replace=1), [0, 2]),  # the dense prefix goes
    "glm4_moe": (dict(first_k_dense_replace=2), [1]),  # the dense prefix shrinks to one layer
    "qwen2_moe": (dict(mlp_only_layers=[1]), [0]),
    "ernie4_5_moe": (dict(moe_layer_start_index=1), [2]),
}


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def greedy(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          use_cache=True, pad_token_id=0)


def skip_layers(model, indices):
    """Forward hooks turning decoder layers into identities (their input, in their output format)."""
    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    _, layers = decoder_layers(model)
    return [layers[i].register_forward_hook(identity, with_kwargs=True) for i in indices]


def zero_moe(model, indices):
    """Forward hooks replacing the MoE block output of these layers by zeros (in the block's output format)."""
    def zeros(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    blocks = {m.index: m.block for m in moe_layers(model).values()}
    return [model.get_submodule(blocks[i]).register_forward_hook(zeros) for i in indices]


def reference(model, hooks_of, indices, probe, ids):
    handles = hooks_of(model, indices)
    try:
        return logits(model, probe), greedy(model, ids)
    finally:
        for h in handles:
            h.remove()


def assert_described_by_config(model):
    """The (edited) config rebuilds exactly this model's parameters: names and shapes."""
    rebuilt = empty_model(model.config)
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}


def inputs():
    probe = make_batches(n_batches=1, batch_size=3, seq_len=10, seed=1, pad="right")[0]
    return probe, torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_drop_equals_skipped_layers(family):
    overrides, blocks = BLOCK_CASES.get(family, ({}, [1]))
    model = tiny_model(family, num_hidden_layers=4, **overrides)
    probe, ids = inputs()
    original = logits(model, probe)
    expected, expected_ids = reference(model, skip_layers, blocks, probe, ids)
    assert not torch.allclose(expected, original)  # the dropped layers mattered
    drop_blocks(model, blocks)
    _, layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 4 - len(blocks)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
    torch.testing.assert_close(logits(model, probe), expected, rtol=0, atol=1e-6)
    assert torch.equal(greedy(model, ids), expected_ids)
    assert_described_by_config(model)


def test_block_drop_rewrites_layouts():
    model = tiny_model("gpt_oss", num_hidden_layers=4)
    drop_blocks(model, [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    model = tiny_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)  # MoE at 1 and 3
    drop_blocks(model, [0])
    assert (model.config.decoder_sparse_step, model.config.mlp_only_layers) == (1, [1])
    assert_described_by_config(model)
    model = tiny_model("ernie4_5_moe", num_hidden_layers=4, moe_layer_interval=2)  # MoE at 1 and 3
    drop_blocks(model, [1])  # MoE left at 2 only
    assert_described_by_config(model)
    with pytest.raises(ValueError, match="moe_layer_interval"):  # MoE at 0 and 2 of 3: no start/end/interval
        drop_blocks(tiny_model("ernie4_5_moe", num_hidden_layers=4, moe_layer_interval=2), [0])


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_equals_zeroed_moe(family):
    model = tiny_model(family, num_hidden_layers=3)
    probe, ids = inputs()
    original = logits(model, probe)
    expected, expected_ids = reference(model, zero_moe, [1], probe, ids)
    assert not torch.allclose(expected, original)  # the dropped MoE sublayer mattered
    drop_moe_sublayers(model, [1])
    torch.testing.assert_close(logits(model, probe), expected, rtol=0, atol=1e-6)
    assert torch.equal(greedy(model, ids), expected_ids)
    assert sorted(m.index for m in moe_layers(model).values()) == [0, 2]
    assert getattr(model.config, DROPPED_MOE_FIELD) == [1]
    assert_described_by_config(model)
    assert set(fmoe.score(model, criterion="magnitude").tensors) == set(fmoe.find_experts(model))


def roundtrip(model, tmp_path, stock):
    probe, _ = inputs()
    fmoe.save_pretrained(model, tmp_path / "m")
    fmt = json.loads((tmp_path / "m" / "config.json").read_text())["fmoe_format"]
    assert fmt == ("stock" if stock else "fused")
    loader = AutoModelForCausalLM.from_pretrained if stock else fmoe.from_pretrained
    loaded = loader(tmp_path / "m").eval()
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    return loaded


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_block_drop_roundtrip(family, tmp_path):
    overrides, blocks = BLOCK_CASES.get(family, ({}, [1]))
    model = drop_blocks(tiny_model(family, num_hidden_layers=4, **overrides), blocks)
    roundtrip(model, tmp_path, stock=family != "deepseek_v3")  # DeepSeek's shared experts: always fused


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_layer_drop_roundtrip(family, tmp_path):
    model = drop_moe_sublayers(tiny_model(family, num_hidden_layers=3), [0, 2])
    loaded = roundtrip(model, tmp_path, stock=False)
    assert getattr(loaded.config, DROPPED_MOE_FIELD) == [0, 2]
    assert fmoe.fingerprint(loaded) == fmoe.fingerprint(model)


def test_layer_dropped_checkpoint_prunes_offline(tmp_path):
    model = drop_moe_sublayers(tiny_model("qwen2_moe", num_hidden_layers=3), [1])
    fmoe.save_pretrained(model, tmp_path / "dropped")
    scores = fmoe.score_checkpoint(tmp_path / "dropped")
    assert scores.fingerprint == fmoe.fingerprint(model)
    plan = fmoe.make_plan(scores, 0.5, "layer", multiple_of=1)
    fmoe.prune_checkpoint(tmp_path / "dropped", plan, tmp_path / "pruned")
    probe, _ = inputs()
    assert torch.equal(logits(fmoe.from_pretrained(tmp_path / "pruned"), probe), logits(fmoe.prune(model, plan), probe))


def test_block_drop_after_ragged_prune(tmp_path):
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    fmoe.prune(model, fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.5, "layer", multiple_of=1))
    widths = {n: expert_widths(m) for n, m in fmoe.find_experts(model).items()}
    assert any(isinstance(m, fmoe.RaggedExperts) for m in fmoe.find_experts(model).values())
    drop_blocks(model, [0, 2])
    renamed = {"model.layers.0.mlp.experts": widths["model.layers.1.mlp.experts"],
               "model.layers.1.mlp.experts": widths["model.layers.3.mlp.experts"]}
    assert getattr(model.config, WIDTHS_FIELD) == renamed
    assert {n: expert_widths(m) for n, m in fmoe.find_experts(model).items()} == renamed
    roundtrip(model, tmp_path, stock=False)


def test_plan_applies_moe_drops_then_blocks(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=4)
    plan = DropPlan(moe_layers=[2], blocks=[0], num_layers=4, fingerprint=fmoe.fingerprint(model))
    plan.save(tmp_path / "plan.json")
    assert DropPlan.load(tmp_path / "plan.json") == plan
    probe, ids = inputs()
    handles = zero_moe(model, [2]) + skip_layers(model, [0])
    expected = logits(model, probe)
    for h in handles:
        h.remove()
    drop(model, DropPlan.load(tmp_path / "plan.json"))
    torch.testing.assert_close(logits(model, probe), expected, rtol=0, atol=1e-6)
    assert getattr(model.config, DROPPED_MOE_FIELD) == [1]
    roundtrip(model, tmp_path, stock=False)
    with pytest.raises(ValueError, match="decoder layers"):
        drop(model, plan)
    with pytest.raises(ValueError, match="fingerprint"):
        drop(tiny_model("mixtral", seed=1, num_hidden_layers=4), plan)


def similarity(values):
    """A block similarity S [L+1, L+1] whose S[l, l+k] is values[k][l] (other entries 0)."""
    n = len(values[1])
    s = torch.zeros(n + 1, n + 1)
    for k, row in values.items():
        for l, v in enumerate(row):
            s[l, l + k] = v
    return s


def test_block_plans():
    model = tiny_model("olmoe", num_hidden_layers=4)
    s = similarity({1: [0.1, 0.9, 0.5, 0.8], 2: [0.3, 0.7, 0.6]})
    plan = plan_block_drop(model, s, count=2)
    assert (plan.blocks, plan.moe_layers, plan.num_layers) == ([1, 3], [], 4)
    assert plan.meta["achieved"] == 0.5 and 0 < plan.meta["params_removed"] < 0.5
    assert plan_block_drop(model, s, count=2, mode="consecutive").blocks == [1, 2]
    assert plan_block_drop(model, s, amount=0.3).blocks == [1]  # 1/4 of the routed parameters is nearest
    assert plan_block_drop(model, s, amount=0.5, mode="consecutive").blocks == [1, 2]


def test_layer_plans():
    model = tiny_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1)
    sim = torch.tensor([float("nan"), 0.2, 0.9, 0.5])
    plan = plan_layer_drop(model, sim, count=2)
    assert (plan.moe_layers, plan.blocks) == ([2, 3], [])
    assert plan.meta["achieved"] == pytest.approx(2 / 3)
    assert plan_layer_drop(model, sim, amount=0.4).moe_layers == [2]  # 1/3 nearer 0.4 than 2/3
    drop(model, plan)
    assert [m.index for m in moe_layers(model).values()] == [1]


def test_plan_errors():
    model = tiny_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1)
    sim = torch.tensor([float("nan"), 0.2, 0.9, 0.5])
    s = similarity({1: [0.1, 0.9, 0.5, 0.8], 2: [0.3, 0.7, 0.6]})
    s_nan = similarity({1: [0.1, float("nan"), 0.5, 0.8]})
    errors = [
        (lambda: plan_layer_drop(model, sim, count=3), "leaves none"),
        (lambda: plan_layer_drop(model, sim, count=-1), "count"),
        (lambda: plan_layer_drop(model, sim), "exactly one"),
        (lambda: plan_layer_drop(model, sim, count=1, amount=0.2), "exactly one"),
        (lambda: plan_layer_drop(model, torch.tensor([0.1, float("nan"), 0.9, 0.5]), count=1), "NaN at MoE layers"),
        (lambda: plan_layer_drop(model, sim[:3], count=1), "shape"),
        (lambda: plan_block_drop(model, s, count=4), "leaves none"),
        (lambda: plan_block_drop(model, s[:4, :4], count=1), "shape"),
        (lambda: plan_block_drop(model, s, count=1, mode="window"), "valid: discrete, consecutive"),
        (lambda: plan_block_drop(model, s_nan, count=1), "NaN"),
        (lambda: plan_block_drop(model, s, amount=1.0), "amount"),
        (lambda: drop_moe_sublayers(model, [0]), "no MoE sublayer"),
        (lambda: drop_moe_sublayers(model, [1, 2, 3]), "leaves none"),
        (lambda: drop_blocks(model, [0, 1, 2, 3]), "all 4 decoder layers"),
        (lambda: drop_blocks(model, [4]), "out of range"),
    ]
    for call, message in errors:
        with pytest.raises(ValueError, match=message):
            call()


def test_refused_block_drop_changes_nothing():
    model = tiny_model("ernie4_5_moe", num_hidden_layers=6, moe_layer_interval=2)  # MoE at 1, 3, 5
    keys, config = list(model.state_dict()), model.config.to_dict()
    with pytest.raises(ValueError, match="cannot be written"):  # MoE at 1, 2, 4 of 5: no start/end/interval
        drop_blocks(model, [2])
    assert list(model.state_dict()) == keys
    assert model.config.to_dict() == config
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)[1]] == list(range(6))
    drop_blocks(model, [2, 3])  # MoE at 1, 3 of 4
    assert_described_by_config(model)


def test_block_plans_skip_unwritable_layouts():
    model = tiny_model("ernie4_5_moe", num_hidden_layers=6, moe_layer_interval=2)  # MoE at 1, 3, 5
    s = similarity({1: [0.5, 0.6, 0.9, 0.7, 0.8, 0.1], 3: [0.9, 0.1, 0.5, 0.2]})
    assert plan_block_drop(model, s, count=1).blocks == [5]  # dropping only 0, 1, 2, 3 or 4 cannot be written
    assert plan_block_drop(model, s, amount=0.3).blocks == [5]
    plan = plan_block_drop(model, s, count=3, mode="consecutive")
    assert plan.blocks == [2, 3, 4]  # window 0..2 leaves MoE at 0, 2 of 3: cannot be written
    drop(model, plan)
    assert_described_by_config(model)
    model = tiny_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1)  # MoE at 1, 2, 3
    s = similarity({1: [0.1, 0.9, 0.5, 0.8], 2: [0.3, 0.7, 0.6], 3: [0.2, 0.4]})
    assert plan_block_drop(model, s, count=3).blocks == [0, 1, 3]  # the top 3 would remove every MoE layer
    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0, 2, 3])  # MoE at 1 only
    with pytest.raises(ValueError, match="no consecutive choice of 3 blocks"):
        plan_block_drop(model, s, count=3, mode="consecutive")


def test_block_drop_renames_only_layer_fields():
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    counts = {"model.layers.1.mlp.experts": 3, "model.layers.2.mlp.experts": 2, "model.layers.3.mlp.experts": 1}
    setattr(model.config, EXPERT_COUNTS_FIELD, counts)
    model.config.fmoe_other = [1, 2]  # not a layer field: left as it is
    drop_blocks(model, [0, 2])
    assert getattr(model.config, EXPERT_COUNTS_FIELD) == {"model.layers.0.mlp.experts": 3,
                                                          "model.layers.1.mlp.experts": 1}
    assert model.config.fmoe_other == [1, 2]
