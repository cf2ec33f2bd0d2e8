"""Checkpoints saved after a compression reload with Lightning's own loading: the plans travel in the checkpoint and
are applied before the state dict loads."""

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

import fmoe
from fmoe.model.experts import RaggedExperts, expert_widths
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.callbacks import Compression, FisherScoring, IntermediatePruning
from fmoe.lightning.plans import RestorePlans
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_lightning import sequences, trainer


class PrunableLM(RestorePlans, L.LightningModule):
    """A user's module: builds its (dense) model from its hyperparameters and trains it."""

    def __init__(self, family: str = "olmoe", lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_model(family)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    probe = make_batches(n_batches=1, seed=5, pad="right")[0]
    with torch.no_grad():
        torch.testing.assert_close(a(**probe).logits, b(**probe).logits, rtol=0, atol=0)


def widths(model):
    return {n: expert_widths(m) for n, m in fmoe.find_experts(model).items()}


def test_a_users_module_pruned_in_its_fit_reloads_from_a_checkpoint(tmp_path):
    module = PrunableLM()
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=tmp_path / "out")
    fit = trainer(tmp_path, callbacks=[FisherScoring(), pruning])
    fit.fit(module, DataLoader(sequences(), batch_size=4))  # lr > 0: the weights the plan prunes were trained
    assert any(isinstance(m, RaggedExperts) for m in fmoe.find_experts(module.model).values())
    assert pruning.plan.kept_widths() == widths(module.model)
    fit.save_checkpoint(tmp_path / "pruned.ckpt")
    loaded = PrunableLM.load_from_checkpoint(tmp_path / "pruned.ckpt")
    same_model(loaded.model, module.model)
    # a later fit resumes from it (Lightning's ckpt_path), and its own checkpoints reload too
    again = PrunableLM()
    later = trainer(tmp_path, max_epochs=2)
    later.fit(again, DataLoader(sequences(), batch_size=4), ckpt_path=tmp_path / "pruned.ckpt")
    assert widths(again.model) == widths(module.model)
    later.save_checkpoint(tmp_path / "later.ckpt")
    same_model(PrunableLM.load_from_checkpoint(tmp_path / "later.ckpt").model, again.model)


@pytest.mark.parametrize("method, options", [("expert_drop", {"scope": "global"}), ("layer_drop", {"count": 1}),
                                             ("block_drop", {"count": 1})])
def test_a_calibration_checkpoint_after_a_drop_reloads(tmp_path, method, options):
    model = tiny_model("qwen2_moe")
    module = CalibrationModule(model, criterion="router")
    compression = Compression(method, 0.25 if "count" not in options else None, save_dir=tmp_path / "out", **options)
    fit = trainer(tmp_path, callbacks=[compression])
    fit.fit(module, DataLoader(sequences(), batch_size=4))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_model("qwen2_moe").parameters())
    fit.save_checkpoint(tmp_path / "dropped.ckpt")
    loaded = CalibrationModule.load_from_checkpoint(tmp_path / "dropped.ckpt", model=tiny_model("qwen2_moe"))
    same_model(loaded.model, model)


def test_plans_apply_once_and_a_model_edited_otherwise_is_refused(tmp_path):
    from fmoe.lightning.plans import record_plan

    module = PrunableLM()
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=tmp_path / "out")
    trainer(tmp_path, callbacks=[FisherScoring(), pruning]).fit(module, DataLoader(sequences(), batch_size=4))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    before = widths(module.model)
    module.on_load_checkpoint(checkpoint)  # the plans it already has: nothing to apply
    assert widths(module.model) == before
    other = PrunableLM()
    plan = fmoe.make_plan(fmoe.score(other.model, criterion="magnitude"), 0.25, "layer", multiple_of=4)
    fmoe.prune(other.model, plan)
    record_plan(other.model, plan)
    with pytest.raises(ValueError, match="does not record"):
        other.on_load_checkpoint(checkpoint)
