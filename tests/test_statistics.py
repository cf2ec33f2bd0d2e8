import pytest
import torch
import torch.nn.functional as F

import fmoe
from fmoe.model.layers import decoder_layers, moe_layers
from fmoe.model.hooks import experts_hooks
from fmoe.model.experts import experts_forward
from fmoe.calibration.loss import prepare_batch
from fmoe.calibration.scorer import Scorer
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches, unpadded


def plain_forward(model, raw):
    """The untouched model on a batch, positions counted over real tokens (as calibration runs it); the mask of
    real tokens [B*T]."""
    batch = prepare_batch(raw)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    output_hidden_states=True)
    return out, batch.attention_mask.reshape(-1).bool()


def close(a, b, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def assert_same(a: fmoe.Statistics, b: fmoe.Statistics, rtol=1e-4, atol=1e-6):
    assert a.experts.keys() == b.experts.keys()
    for criterion, by_name in a.experts.items():
        for name, t in by_name.items():
            scale = float(b.experts[criterion][name].abs().max())
            close(t, b.experts[criterion][name], rtol=rtol, atol=atol * max(scale, 1e-6))
    close(a.moe_similarity, b.moe_similarity, rtol, atol)
    close(a.block_similarity, b.block_similarity, rtol, atol)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_router_and_frequency_equal_the_routers_own_outputs(family):
    model = tiny_model(family)
    batches = make_batches(n_batches=2)
    stats = fmoe.measure(model, batches, fisher=False)
    layers = moe_layers(model)
    modules = dict(model.named_modules())
    probs = {n: 0.0 for n in layers}
    counts = {n: 0.0 for n in layers}
    tokens = 0
    seen = {}
    handles = [modules[layer.router].register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out)) for n, layer in layers.items()]
    for raw in batches:
        _, valid = plain_forward(model, raw)
        tokens += int(valid.sum())
        for n, (logits, weights, ids) in seen.items():
            if family == "deepseek_v3":  # sigmoid router: the applied top-k weights, zeros elsewhere
                p = (F.one_hot(ids, logits.shape[-1]) * weights.float()[..., None]).sum(1)
            else:
                p = logits.float().softmax(-1)
            probs[n] = probs[n] + p[valid].double().sum(0)
            counts[n] = counts[n] + F.one_hot(ids[valid], 4).sum((0, 1)).double()
    for h in handles:
        h.remove()
    for n in layers:
        close(stats.experts["router"][n], probs[n] / tokens)
        close(stats.experts["frequency"][n], counts[n] / tokens)
        assert stats.experts["frequency"][n].sum().item() == pytest.approx(2.0)  # top-2
    assert "fisher" not in stats.experts


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_reap_equals_a_loop_over_tokens_and_experts(family):
    model = tiny_model(family)
    batches = make_batches(n_batches=1)
    stats = fmoe.measure(model, batches, fisher=False)
    experts = fmoe.find_experts(model)
    calls = {}
    handles = [m.register_forward_pre_hook(lambda m, args, n=n: calls.__setitem__(n, args)) for n, m in experts.items()]
    _, valid = plain_forward(model, batches[0])
    for h in handles:
        h.remove()
    for name, (x, ids, weights) in calls.items():
        total, pairs = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        for t in valid.nonzero()[:, 0].tolist():
            for k in range(ids.shape[1]):
                e = ids[t, k]
                with torch.no_grad():  # o of one (token, expert) pair: weight 1
                    o = experts_forward(experts[name], x[t:t + 1], e.view(1, 1), torch.ones(1, 1))
                total[e] += weights[t, k].double() * o.double().norm()
                pairs[e] += 1
        assert total.sum() > 0
        close(stats.experts["reap"][name], total / pairs.clamp(min=1), rtol=1e-4, atol=1e-7)  # unrouted: 0


class OutputMask:
    """g[e] multiplies expert e's output (before the routing weight)."""

    def __init__(self, g):
        self.g = g

    def __call__(self, routing, h):
        return h

    def on_output(self, routing, o):
        return o * self.g[routing.experts][:, None]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_expert_fisher_equals_autograd_through_a_mask_on_each_experts_output(family):
    model = tiny_model(family)
    batches = make_batches(n_batches=1, batch_size=3)
    stats = fmoe.measure(model, batches)
    experts = list(fmoe.find_experts(model))
    total = {n: torch.zeros(4, dtype=torch.float64) for n in experts}
    for p in model.parameters():
        p.requires_grad_(False)
    for seq in unpadded(batches):
        masks = {n: torch.ones(4, requires_grad=True) for n in experts}
        with experts_hooks(model, {n: OutputMask(g) for n, g in masks.items()}):
            loss = model(input_ids=seq["input_ids"], labels=seq["input_ids"]).loss
        for n, g in zip(masks, torch.autograd.grad(loss, list(masks.values())), strict=True):
            total[n] += g.double() ** 2
    for n, expected in total.items():
        assert expected.sum() > 0
        close(stats.experts["fisher"][n], expected, rtol=2e-3, atol=1e-10)


SIMILARITY_CASES = [(f, {"first_k_dense_replace": 1} if f == "deepseek_v3" else {}) for f in FAMILIES] + [
    ("granitemoe", {"residual_multiplier": 0.5})]  # the layer adds 0.5 x MoE to the residual


@pytest.mark.parametrize("family,overrides", SIMILARITY_CASES, ids=[f + "".join(f"-{k}={v}" for k, v in o.items())
                                                                    for f, o in SIMILARITY_CASES])
def test_similarities_equal_the_hidden_states(family, overrides):
    """moe_similarity is cos(x', y) with y the decoder layer's real output (x' plus what the MoE sublayer adds,
    scaled where the family scales it), block_similarity the cosines of the layers' inputs."""
    model = tiny_model(family, **overrides)
    batches = make_batches(n_batches=2)
    stats = fmoe.measure(model, batches, fisher=False)
    _, layers = decoder_layers(model)
    n_layers = len(layers)
    moe = {layer.index for layer in moe_layers(model).values()}
    captured = {}
    handles = [model.model.norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("last", args[0]))]
    for i, layer in enumerate(layers):  # x' (post-attention residual) and the layer output x' + block(norm(x'))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(("x", i), args[0])))
        handles.append(layer.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(("y", i), out[0] if isinstance(out, tuple) else out)))
    block, moe_sim, tokens = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64), torch.zeros(n_layers), 0
    for raw in batches:
        out, valid = plain_forward(model, raw)
        states = [h.reshape(-1, 64)[valid] for h in (*out.hidden_states[:-1], captured["last"])]
        for i in range(n_layers + 1):
            for j in range(n_layers + 1):
                block[i, j] += F.cosine_similarity(states[i], states[j], dim=-1).double().sum()
        for i in range(n_layers):
            x, y = (captured[(k, i)].reshape(-1, 64)[valid] for k in "xy")
            moe_sim[i] += F.cosine_similarity(x, y, dim=-1).sum()
        tokens += int(valid.sum())
    for h in handles:
        h.remove()
    close(stats.block_similarity, block / tokens, rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.block_similarity, stats.block_similarity.T)
    assert (stats.block_similarity.diagonal() == 1).all()
    for i in range(n_layers):
        if i in moe:
            close(stats.moe_similarity[i], moe_sim[i] / tokens, rtol=1e-4, atol=1e-5)
        else:
            assert stats.moe_similarity[i].isnan()
    assert stats.meta["layers"] == {n: layer.index for n, layer in moe_layers(model).items()}


def test_padding_never_counts():
    model = tiny_model("qwen3_moe")
    padded = make_batches(n_batches=1, batch_size=4)
    assert_same(fmoe.measure(model, padded), fmoe.measure(model, unpadded(padded)), rtol=2e-3, atol=1e-5)


def run(model, batches, criterion="fisher", structure=True):
    scorer = Scorer(model, criterion, structure=structure)
    with scorer.attached():
        for batch in batches:
            scorer.step(batch)
    return scorer


def test_two_batches_sum_the_states_of_two_runs_and_leave_the_dim_scores_unchanged():
    model = tiny_model("gpt_oss")
    batches = make_batches(n_batches=2)
    both, first, second = run(model, batches), run(model, batches[:1]), run(model, batches[1:])
    states = [s.state() for s in (both, first, second)]
    assert any(k.startswith("structure/fisher/") for k in states[0])
    for key, t in states[0].items():
        torch.testing.assert_close(t, states[1][key] + states[2][key], rtol=1e-5, atol=1e-12)
    plain = run(model, batches, structure=False)
    assert plain.state().keys() == {k for k in states[0] if not k.startswith("structure/")}
    assert all(torch.equal(t, both.result().tensors[n]) for n, t in plain.result().tensors.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_dropped_step_adds_nothing():
    """A step whose gradients overflow (skip_non_finite, as under an fp16 GradScaler) adds no statistic at all."""
    model = tiny_model("mixtral")
    batches = make_batches(n_batches=2)
    calls = []

    def poison(module, grad_output):  # the first backward's gradients are NaN; the loss stays finite
        calls.append(1)
        return (grad_output[0] * float("nan"),) if len(calls) == 1 else None

    handle = model.lm_head.register_full_backward_pre_hook(poison)
    scorer = Scorer(model, "fisher", structure=True)
    with scorer.attached():
        assert scorer.step(batches[0], skip_non_finite=True) is None
        scorer.step(batches[1], skip_non_finite=True)
    handle.remove()
    assert_same(scorer.statistics(), run(model, batches[1:]).statistics(), rtol=1e-5, atol=1e-7)
    with pytest.raises(FloatingPointError, match="non-finite gradient in"):
        handle = model.lm_head.register_full_backward_pre_hook(lambda m, g: (g[0] * float("nan"),))
        run(model, batches[:1])
    handle.remove()


def test_calibration_module_statistics_equal_measure(tmp_path):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from fmoe.lightning.calibration import CalibrationModule
    from tests.test_lightning import sequences

    model = tiny_model("qwen2_moe")
    data = sequences()
    expected = fmoe.measure(model, [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)])
    module = CalibrationModule(model, structure=True)
    L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(
        module, DataLoader(data, batch_size=4))
    assert_same(module.statistics, expected)
    assert module.statistics.samples == 8 and module.statistics.fingerprint == fmoe.fingerprint(model)


def test_save_load_roundtrip_and_clear_errors(tmp_path):
    model = tiny_model("olmoe")
    stats = fmoe.measure(model, make_batches(n_batches=1))
    stats.save(tmp_path / "s")
    loaded = fmoe.Statistics.load(tmp_path / "s")
    assert (loaded.fingerprint, loaded.samples, loaded.tokens, loaded.meta) == (
        stats.fingerprint, stats.samples, stats.tokens, stats.meta)
    assert list(loaded.experts) == list(stats.experts) == ["router", "frequency", "reap", "fisher"]
    for criterion, by_name in stats.experts.items():
        assert all(torch.equal(loaded.experts[criterion][n], t) for n, t in by_name.items())
    assert torch.equal(loaded.moe_similarity, stats.moe_similarity)
    assert torch.equal(loaded.block_similarity, stats.block_similarity)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    with pytest.raises(FileNotFoundError, match="no fmoe statistics"):
        fmoe.Statistics.load(tmp_path)
    with pytest.raises(ValueError, match="structure=True"):
        run(model, make_batches(n_batches=1), structure=False).statistics()
    with pytest.raises(ValueError, match="no calibration sample"):
        fmoe.measure(model, [])
