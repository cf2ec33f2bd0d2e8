"""The load-balancing loss (`output_router_logits=True`) on models whose layers keep different expert counts."""

import copy
import inspect
import sys

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fmoe
from fmoe.model.layers import moe_layers
from fmoe.model.structure import EXPERT_COUNTS_FIELD
from fmoe.methods.expert_drop import drop_experts, plan_experts
from fmoe.model.experts import num_experts
from fmoe.lightning.recovery import LoRARecovery
from tests.conftest import make_batches
from tests.test_expert_drop import eight
from tests.test_lightning import sequences, trainer

# families whose causal LM adds transformers' pooled load-balancing loss; DeepSeek and GLM-4-MoE compute none
WITH_AUX = ("qwen2_moe", "mixtral", "olmoe", "qwen3_moe", "phimoe", "gpt_oss", "granitemoe", "ernie4_5_moe")
WITHOUT_AUX = ("deepseek_v2", "deepseek_v3", "glm4_moe")


def counts(model):
    return [num_experts(m) for m in fmoe.find_experts(model).values()]


def dropped(model, offset):
    """A copy of `model` (8 experts a layer) after a global drop planned from scores that run `offset` higher in
    the second layer (experts in a shuffled order): offset 3.5 keeps [3, 6], offset 6.5 keeps [1, 6]."""
    gen = torch.Generator().manual_seed(0)
    scores = {name: torch.randperm(8, generator=gen).double() + i * offset
              for i, name in enumerate(fmoe.find_experts(model))}
    model = copy.deepcopy(model)
    return drop_experts(model, plan_experts(model, scores, count=7 if offset < 5 else 9, scope="global",
                                            normalize="none"))


def stock_loss(model):
    """transformers' own load_balancing_loss_func of the model's family (as shipped, whatever fmoe installed)."""
    return inspect.unwrap(sys.modules[type(model).__module__].load_balancing_loss_func)


def probe():
    batch = make_batches(n_batches=1, batch_size=3, pad="mixed", seed=3)[0]
    return batch, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def pooled_reference(gate_logits, top_k, mask):
    """The pooled loss written out: f_e = selections of expert e over all layers' real tokens / their count, P_e =
    routing probability likewise, loss = E * sum_e f_e P_e, E the largest expert count; a layer of E_l experts
    selects min(top_k, E_l) of them and gives experts E_l..E-1 nothing."""
    width, weight = max(g.shape[-1] for g in gate_logits), mask.reshape(-1, 1).double()  # [T, 1]
    f = p = rows = 0
    for g in gate_logits:
        probs = g.double().softmax(-1)  # [T, E_l]
        chosen = F.one_hot(probs.topk(min(top_k, g.shape[-1]), -1).indices, width).sum(1)  # [T, E]
        f = f + (chosen * weight).sum(0)
        p = p + F.pad(probs * weight, (0, width - g.shape[-1])).sum(0)
        rows = rows + weight.sum()
    return width * ((f / rows) * (p / rows)).sum()


@pytest.mark.parametrize("family", WITH_AUX)
def test_uneven_counts_give_the_stock_loss_of_zero_probability_padding(family):
    """Uneven counts: the stock loss of each layer's router logits padded with -inf to the largest count (experts
    that are never routed to), `.loss` = NLL + router_aux_loss_coef * aux_loss, and a gradient to the routers.
    Equal counts (the unpruned model, a per-layer drop) keep the stock loss exactly."""
    model = eight(family)
    batch, labels = probe()
    mask, top_k = batch["attention_mask"], model.config.num_experts_per_tok
    uneven = dropped(model, 3.5)
    assert counts(uneven) == [3, 6]
    stock = stock_loss(model)
    out = model(**batch, output_router_logits=True)
    assert torch.equal(out.aux_loss, stock(out.router_logits, 8, top_k, mask))
    even = copy.deepcopy(model)
    drop_experts(even, plan_experts(even, {n: torch.arange(8.0) for n in fmoe.find_experts(even)}, count=2))
    out = even(**batch, output_router_logits=True)
    assert torch.equal(out.aux_loss, stock(out.router_logits, 6, top_k, mask))

    out = uneven(**batch, labels=labels, output_router_logits=True)
    assert [g.shape[-1] for g in out.router_logits] == [3, 6]
    padded = tuple(F.pad(g, (0, 6 - g.shape[-1]), value=float("-inf")) for g in out.router_logits)
    torch.testing.assert_close(out.aux_loss, stock(padded, 6, top_k, mask))
    torch.testing.assert_close(out.aux_loss, pooled_reference(out.router_logits, top_k, mask).float())
    nll = uneven(**batch, labels=labels).loss
    torch.testing.assert_close(out.loss, nll + uneven.config.router_aux_loss_coef * out.aux_loss)
    out.aux_loss.backward()
    grads = [uneven.get_submodule(layer.router).weight.grad for layer in moe_layers(uneven).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.any() for g in grads)


@pytest.mark.parametrize("family", [f for f in WITH_AUX if f != "phimoe"])  # phimoe keeps two experts a layer
def test_a_layer_with_fewer_experts_than_top_k_selects_what_its_router_selects(family):
    model = eight(family)
    batch, _ = probe()
    uneven = dropped(model, 6.5)
    assert counts(uneven) == [1, 6]
    out = uneven(**batch, output_router_logits=True)
    reference = pooled_reference(out.router_logits, model.config.num_experts_per_tok, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, reference.float())


@pytest.mark.parametrize("family", WITH_AUX)
def test_uneven_counts_keep_their_aux_loss_through_save_and_load(family, tmp_path, monkeypatch):
    uneven = dropped(eight(family), 3.5)
    batch, labels = probe()
    expected = uneven(**batch, labels=labels, output_router_logits=True)
    fmoe.save_pretrained(uneven, tmp_path)
    module = sys.modules[type(uneven).__module__]  # as in a fresh process: transformers' function, until loading
    monkeypatch.setattr(module, "load_balancing_loss_func", stock_loss(uneven))
    loaded = fmoe.from_pretrained(tmp_path)
    assert getattr(loaded.config, EXPERT_COUNTS_FIELD) and counts(loaded) == [3, 6]
    out = loaded(**batch, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    torch.testing.assert_close(out.loss, expected.loss)


@pytest.mark.parametrize("family", WITHOUT_AUX)
def test_families_without_aux_loss_return_uneven_router_logits(family):
    uneven = dropped(eight(family), 3.5)
    batch, labels = probe()
    out = uneven(**batch, labels=labels, output_router_logits=True)
    assert getattr(out, "aux_loss", None) is None
    assert [g.shape[-1] for g in out.router_logits] == [3, 6] and torch.isfinite(out.loss)


class AuxUser(L.LightningModule):
    """A user's fine-tuning step: HF's `.loss` with labels, the load-balancing term included by the config."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def training_step(self, batch, batch_idx):
        out = self.model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        self.seen.append((out.loss.detach(), out.aux_loss.detach()))
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "qwen3_moe"])
def test_fits_train_on_the_aux_loss_after_an_uneven_drop(family, tmp_path):
    """fmoe's expert drop at global scope, then a user's fit and the LoRA stage with output_router_logits on."""
    model = eight(family)
    teacher = copy.deepcopy(model)
    calibration = fmoe.calibrate(model, make_batches(n_batches=1, seed=1), progress=False)
    fmoe.compress(model, "expert_drop", 0.3, calibration, scope="global")
    assert len(set(counts(model))) > 1
    model.config.output_router_logits = True
    data = DataLoader(sequences(), batch_size=4)
    user = AuxUser(model)
    trainer(tmp_path, max_steps=2).fit(user, data)
    assert len(user.seen) == 2 and all(torch.isfinite(loss) and aux > 0 for loss, aux in user.seen)

    coef = model.config.router_aux_loss_coef
    for options in ({}, {"teacher": teacher, "kd_weight": 0.5}):  # data loss, distillation
        fit = trainer(tmp_path, max_steps=2)
        fit.fit(LoRARecovery(copy.deepcopy(model), r=4, eval_names=(), **options), data)
        logged = {k: float(v) for k, v in fit.callback_metrics.items()}
        assert all(map(torch.isfinite, map(torch.tensor, logged.values()))) and logged["train_aux"] > 0
        data_loss = 0.5 * (logged["train_kd"] + logged["train_nll"]) if options else logged["train_nll"]
        assert logged["train_loss"] == pytest.approx(data_loss + coef * logged["train_aux"], rel=1e-5)
