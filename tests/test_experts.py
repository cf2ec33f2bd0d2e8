import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fmoe
from fmoe.model.experts import RaggedExperts, expert_parameters, expert_widths, experts_forward, num_experts
from fmoe.model.structure import apply_widths
from fmoe.toy.tiny import FAMILIES, tiny_model


def loop_forward(module, hidden, top_k_index, top_k_weights):
    """Reference: one expert at a time, plain matmuls on its own slices (stock and ragged experts alike)."""
    out = torch.zeros_like(hidden)
    for e in range(num_experts(module)):
        tokens, slots = torch.where(top_k_index == e)
        p = module.expert_parameters(e) if isinstance(module, RaggedExperts) else expert_parameters(module, e)
        up, down = p["gate_up_proj" if module.has_gate else "up_proj"], p["down_proj"]
        x = hidden[tokens]
        y = x @ up if module.is_transposed else x @ up.t()
        if module.has_bias:
            y = y + p["gate_up_proj_bias" if module.has_gate else "up_proj_bias"]
        h = module._apply_gate(y) if module.has_gate else module.act_fn(y)
        o = h @ down if module.is_transposed else h @ down.t()
        if module.has_bias:
            o = o + p["down_proj_bias"]
        if getattr(module, "has_post_expert_norm", False):
            o = module.post_expert_norm(o)
        out.index_add_(0, tokens, (o * top_k_weights[tokens, slots, None]).to(out.dtype))
    return out


def cut(family, widths, dtype=torch.float32):
    """Layer 0's experts of a tiny model cut to `widths` (uniform stays stock, otherwise RaggedExperts)."""
    model = tiny_model(family, dtype=dtype)
    name = next(iter(fmoe.find_experts(model)))
    apply_widths(model, {name: [torch.randperm(32)[:w].sort().values for w in widths]})
    return fmoe.find_experts(model)[name]


ROUTINGS = {
    "random": lambda t: torch.stack([torch.randperm(4)[:2] for _ in range(t)]),
    "expert 3 idle": lambda t: torch.stack([torch.randperm(3)[:2] for _ in range(t)]),
    "single token": lambda t: torch.tensor([[2, 0]]),
    "sentinels": lambda t: torch.stack([torch.randperm(6)[:2] for _ in range(t)]),  # ids 4, 5: other ranks' experts
}
WIDTHS = {"full": [32] * 4, "uniform": [16] * 4, "ragged x16": [16, 32, 16, 32], "ragged x4": [8, 12, 4, 32],
          "ragged odd": [13, 7, 32, 1]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("widths", WIDTHS)
def test_grouped_forward_and_backward_match_the_loop(family, widths):
    """The sorted, grouped forward equals one expert at a time in fp32 (outputs, input and weight gradients),
    with idle experts, one token, widths off grouped_mm's 16-byte grid and expert-parallel sentinel ids."""
    torch.manual_seed(0)
    module = cut(family, WIDTHS[widths])
    for routing, make in ROUTINGS.items():
        idx = make(7)
        weights = torch.rand(idx.shape).masked_fill(idx >= 4, 0.0).requires_grad_()  # sentinel slots: no weight
        hidden = torch.randn(idx.shape[0], 64, requires_grad=True)
        probe = torch.randn(idx.shape[0], 64)
        results = []
        for forward in (experts_forward, loop_forward):
            junk = [torch.full((2 * len(idx), 64), float("nan")) for _ in range(8)]
            del junk  # freed NaN blocks: memory grouped_mm leaves uninitialised would hold NaN, not zeros
            out = forward(module, hidden, idx, weights)
            grads = torch.autograd.grad((out * probe).sum(), [hidden, weights, *module.parameters()],
                                        allow_unused=True)  # router gradients too: finite on sentinel slots
            results.append((out, grads))
        (got, got_grads), (expected, expected_grads) = results
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=routing)
        for g, e in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-5, atol=1e-5, msg=routing)
        assert expected.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_grouped_forward_matches_the_loop_by_logits_kl(family):
    model = tiny_model(family, dtype=torch.bfloat16)
    names = list(fmoe.find_experts(model))
    apply_widths(model, {names[0]: [torch.arange(w) for w in (16, 32, 16, 8)]})  # one ragged, one stock layer
    ids = torch.randint(3, 128, (2, 12))
    with fmoe.masked(model, {n: [torch.arange(w) for w in expert_widths(m)] for n, m in fmoe.find_experts(model).items()}):
        grouped = model(input_ids=ids).logits.float()
    for module in fmoe.find_experts(model).values():  # the same model through the per-expert loop
        module.__dict__["forward"] = lambda h, i, w, m=module: loop_forward(m, h, i, w)
    looped = model(input_ids=ids).logits.float()
    kl = torch.nn.functional.kl_div(grouped.log_softmax(-1), looped.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert kl < 1e-3, kl


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
        fmoe.score(dense, criterion="magnitude")


def test_experts_forward_skips_expert_parallel_sentinels():
    module = next(iter(fmoe.find_experts(tiny_model("mixtral")).values()))
    hidden = torch.randn(5, 64)
    idx = torch.tensor([[0, 1], [1, 4], [2, 3], [4, 4], [3, 0]])  # 4 = sentinel (not a local expert)
    w = torch.rand(5, 2)
    out = experts_forward(module, hidden, idx, w.masked_fill(idx == 4, 0.0))
    ref = experts_forward(module, hidden, idx.clamp(max=3), w.masked_fill(idx == 4, 0.0))
    torch.testing.assert_close(out, ref)
