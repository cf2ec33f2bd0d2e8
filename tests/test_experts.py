import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fmoe
from fmoe.experts import expert_widths, experts_forward
from fmoe.tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_discovers_routed_experts_only(family):
    model = tiny_model(family)
    found = fmoe.find_experts(model)
    assert len(found) == model.config.num_hidden_layers
    for name, module in found.items():
        assert name.endswith("experts") and "shared" not in name
        assert expert_widths(module) == [32] * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_our_experts_forward_matches_stock(family):
    """The hookable forward fmoe scores with computes what the transformers implementation computes."""
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 10))
    expected = model(input_ids=ids).logits
    with fmoe.masked(model, {n: [torch.arange(32)] * 4 for n in fmoe.find_experts(model)}):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.config._experts_implementation == "grouped_mm"  # restored


def test_model_without_routed_experts_is_refused():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="'llama'"):
        fmoe.find_experts(dense)
    with pytest.raises(ValueError, match="no routed experts"):
        fmoe.score(dense, method="magnitude")


def test_experts_forward_skips_expert_parallel_sentinels():
    module = next(iter(fmoe.find_experts(tiny_model("mixtral")).values()))
    hidden = torch.randn(5, 64)
    idx = torch.tensor([[0, 1], [1, 4], [2, 3], [4, 4], [3, 0]])  # 4 = sentinel (not a local expert)
    w = torch.rand(5, 2)
    out = experts_forward(module, hidden, idx, w.masked_fill(idx == 4, 0.0))
    ref = experts_forward(module, hidden, idx.clamp(max=3), w.masked_fill(idx == 4, 0.0))
    torch.testing.assert_close(out, ref)
