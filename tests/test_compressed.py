import copy

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

import fmoe
from fmoe.model.checkpoint import is_stock_loadable
from fmoe.model.structure import COMPRESSED_FIELD, VECTORS, CompressedExperts
from fmoe.methods.compressed import compress_experts
from fmoe.model.experts import is_routed_experts
from fmoe.lightning.recovery import LoRARecovery
from fmoe.methods.dims.prune import active_parameters
from fmoe.model.structure import apply_widths
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches

FAMILIES = ["olmoe", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomize_vectors(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rpartition(".")[2] in VECTORS:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_ones_and_main_equal_to_top_k_is_the_unmodified_model(family):
    model = tiny_model(family)
    batch = make_batches(n_batches=1)[0]
    stock_logits = logits(model, batch)
    model.set_experts_implementation("fmoe")  # the same experts arithmetic: bit-identical
    expected = logits(model, batch)
    stock = fmoe.find_experts(model)
    compress_experts(model, main=2)
    found = fmoe.find_experts(model)
    assert found.keys() == stock.keys()
    for name, module in found.items():
        assert isinstance(module, CompressedExperts) and is_routed_experts(module)
        assert module.active_experts == module.main == 2
        for key, param in stock[name].named_parameters(recurse=False):
            assert getattr(module, key) is param  # the same Parameters, under the stock names
    assert torch.equal(logits(model, batch), expected)
    torch.testing.assert_close(logits(model, batch), stock_logits)


def keep_heaviest(module, main):
    """The stock module, made to run only each token's `main` highest-weight experts, weights rescaled to keep
    the token's top-k weight sum."""
    forward = module.forward

    def run(hidden, index, weights):
        w, order = weights.sort(dim=-1, descending=True, stable=True)
        kept = w[:, :main]
        alpha = kept * w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
        return forward(hidden, index.gather(1, order)[:, :main], alpha)

    module.forward = run


@pytest.mark.parametrize("family,top_k,main", [("olmoe", 2, 1), ("olmoe", 3, 2), ("gpt_oss", 2, 1),
                                               ("deepseek_v3", 3, 1), ("qwen2_moe", 2, 1)])
def test_ones_and_main_below_top_k_keep_the_heaviest_experts(family, top_k, main):
    model = tiny_model(family, num_experts_per_tok=top_k)
    model.set_experts_implementation("fmoe")
    reference = copy.deepcopy(model)
    for module in fmoe.find_experts(reference).values():
        keep_heaviest(module, main)
    compress_experts(model, main=main)
    batch = make_batches(n_batches=1)[0]
    torch.testing.assert_close(logits(model, batch), logits(reference, batch))
    assert not torch.allclose(logits(model, batch), logits(tiny_model(family, num_experts_per_tok=top_k), batch))


def expert_loop(module, hidden, index, weights):
    """The compressed-experts formula one token and one expert at a time, with plain matmuls."""
    main, out = module.main, torch.zeros_like(hidden)
    concatenated = module.is_concatenated
    for t in range(hidden.shape[0]):
        w, order = weights[t].sort(dim=-1, descending=True, stable=True)
        ids = index[t][order]
        share = w[main:] / w[main:].sum()
        c1, c3, c2 = (sum(s * getattr(module, v)[a] for s, a in zip(share, ids[main:])) for v in VECTORS)
        for wi, e in zip(w[:main] * w.sum() / w[:main].sum(), ids[:main]):
            up_w, down_w = module.gate_up_proj[e], module.down_proj[e]
            if module.is_transposed:
                up_w, down_w = up_w.T, down_w.T  # [2I, H], [H, I]
            rows_g, rows_u = (slice(0, up_w.shape[0] // 2), slice(up_w.shape[0] // 2, None)) if concatenated else \
                (slice(0, None, 2), slice(1, None, 2))
            up_b = module.gate_up_proj_bias[e] if module.has_bias else torch.zeros(up_w.shape[0])
            g = up_w[rows_g] @ (hidden[t] * c1) + up_b[rows_g]
            u = up_w[rows_u] @ (hidden[t] * c3) + up_b[rows_u]
            if module.stock_class == "GptOssExperts":
                g, u = g.clamp(max=module.limit), u.clamp(-module.limit, module.limit)
                h = (u + 1) * g * torch.sigmoid(g * module.alpha)
            else:
                h = module.act_fn(g) * u
            o = down_w @ (h * c2) + (module.down_proj_bias[e] if module.has_bias else 0)
            out[t] += wi * o
    return out


@pytest.mark.parametrize("family,top_k,main", [("olmoe", 2, 1), ("olmoe", 4, 2), ("gpt_oss", 3, 1)])
def test_random_vectors_equal_a_per_token_loop(family, top_k, main):
    model = compress_experts(tiny_model(family, num_experts_per_tok=top_k), main=main)
    randomize_vectors(model)
    module = next(iter(fmoe.find_experts(model).values()))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 64, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:top_k] for _ in range(9)])  # [T, K]
    weights = torch.rand(9, top_k, generator=gen) + 0.05
    with torch.no_grad():
        torch.testing.assert_close(module(hidden, index, weights), expert_loop(module, hidden, index, weights),
                                   rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_the_vectors_when_only_they_train():
    model = compress_experts(tiny_model("gpt_oss"), main=1).train()
    model.requires_grad_(False)
    vectors = {n: p for n, p in model.named_parameters() if n.rpartition(".")[2] in VECTORS}
    assert len(vectors) == 2 * 3
    for p in vectors.values():
        p.requires_grad_(True)
    batch = make_batches(n_batches=1, batch_size=4, seq_len=16)[0]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vectors.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in vectors)


def fit(module, steps=2):
    data = [{k: v[i] for k, v in b.items()} for b in make_batches(n_batches=2, batch_size=2) for i in range(2)]
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(data, batch_size=2))


def test_lora_recovery_trains_the_vectors_and_merge_keeps_them():
    model = compress_experts(tiny_model("olmoe"), main=1)
    recovery = LoRARecovery(model, r=4, alpha=8, lr=1e-2, eval_names=())
    trained = {n for n, p in recovery.model.named_parameters() if p.requires_grad}
    assert any(n.endswith("compress_act") for n in trained) and any("experts.lora_A" in n for n in trained)
    fit(recovery)
    vectors = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
               if n.rpartition(".")[2] in VECTORS}  # names inside peft's wrappers -> names after merging
    assert all(not torch.equal(v, torch.ones_like(v)) for v in vectors.values())
    batch = make_batches(n_batches=1, seed=3)[0]
    adapted = logits(recovery.model.eval(), batch)
    merged = recovery.merged()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(isinstance(m, CompressedExperts) for m in fmoe.find_experts(merged).values())
    assert all(torch.equal(dict(merged.named_parameters())[n], v) for n, v in vectors.items())
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-4, atol=1e-4)


def test_vectors_train_alone_with_r_0():
    model = compress_experts(tiny_model("qwen2_moe"), main=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recovery = LoRARecovery(model, r=0, lr=1e-2, eval_names=())
    fit(recovery)
    assert recovery.merged() is model
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.rpartition(".")[2] in VECTORS for n in changed)
    with pytest.raises(ValueError, match="compressed experts"):
        LoRARecovery(tiny_model("qwen2_moe"), r=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_save_and_load_round_trip(tmp_path, family):
    model = tiny_model(family)
    if family == "deepseek_v3":  # a uniform dim prune first (widths field), then compression
        apply_widths(model, {n: [torch.arange(16)] * 4 for n in fmoe.find_experts(model)})
    compress_experts(model)
    randomize_vectors(model)
    assert not is_stock_loadable(model)
    fmoe.save_pretrained(model, tmp_path / "out")
    loaded = fmoe.from_pretrained(tmp_path / "out")
    assert getattr(loaded.config, COMPRESSED_FIELD) == {"main": 1}
    assert all(isinstance(m, CompressedExperts) and m.main == 1 for m in fmoe.find_experts(loaded).values())
    batch = make_batches(n_batches=1)[0]
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_active_parameters_fall_by_the_auxiliary_experts():
    model = tiny_model("mixtral")  # top-2 of 4 experts, 64 wide, 32 intermediate, 2 layers
    before = active_parameters(model)
    compress_experts(model, main=1)
    expert = 3 * 64 * 32  # gate, up, down
    vectors = 4 * (64 + 64 + 32)  # per layer
    # per layer: one expert fewer computed; the vectors count like expert parameters (main of E experts' share)
    assert active_parameters(model) == pytest.approx(before - 2 * (expert - vectors * 1 / 4))


def test_masking_and_scoring_hooks_see_the_scaled_activation():
    model = compress_experts(tiny_model("olmoe"), main=1)
    randomize_vectors(model)
    batch = make_batches(n_batches=1)[0]
    keep = torch.arange(0, 32, 2)
    with fmoe.masked(model, {n: [keep] * 4 for n in fmoe.find_experts(model)}):
        masked = logits(model, batch)
    with torch.no_grad():
        for m in fmoe.find_experts(model).values():
            m.compress_act[:, 1::2] = 0  # every token's mixed c2 is zero on the dropped dims
    torch.testing.assert_close(masked, logits(model, batch))
    scores = fmoe.score(model, [batch], criterion="activation")  # measures h after the vectors scaled it
    assert set(scores.tensors) == set(fmoe.find_experts(model))
    assert all(bool((t[..., 1::2] == 0).all()) and bool((t[..., ::2] > 0).any()) for t in scores.tensors.values())


def test_refusals_are_clear():
    model = compress_experts(tiny_model("olmoe"))
    with pytest.raises(ValueError, match="compressed already"):
        compress_experts(model)
    ragged = tiny_model("olmoe")
    name = next(iter(fmoe.find_experts(ragged)))
    apply_widths(ragged, {name: [torch.arange(w) for w in (8, 16, 24, 32)]})
    with pytest.raises(ValueError, match="prune dims uniformly"):
        compress_experts(ragged)
    with pytest.raises(TypeError, match="uniform fused"):
        CompressedExperts(fmoe.find_experts(ragged)[name], 1)
    with pytest.raises(TypeError, match="uniform fused"):
        CompressedExperts(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="between 1 and"):
        compress_experts(tiny_model("olmoe"), main=3)


def test_pruning_dims_of_compressed_experts_is_refused():
    model = tiny_model("olmoe")
    plan = fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.5, "layer", multiple_of=8, model=model)
    compress_experts(model)
    with pytest.raises(ValueError, match="prune dims first, then compress"):
        fmoe.prune(model, plan)
