"""One next-token NLL for scoring, evaluation and LoRA recovery: padding never supervised, chunked over positions."""

import pytest
import torch

import fmoe.calibration.loss
from fmoe.lightning.recovery import Evaluation, LoRARecovery
from fmoe.calibration.loss import prepare_batch, sequence_nll
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches, unpadded


def hf_sums(model, sequences):
    """(summed NLL, supervised tokens) of each unpadded sequence from HF's own `.loss`."""
    out = []
    for seq in sequences:
        loss = model(input_ids=seq["input_ids"], labels=seq["input_ids"]).loss
        out.append((loss.double() * (seq["input_ids"].shape[1] - 1), seq["input_ids"].shape[1] - 1))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("pad", ["left", "right", "mixed"])
def test_sequence_nll_is_hf_loss_of_each_sequence_alone(family, pad):
    model = tiny_model(family)
    batch = make_batches(n_batches=1, batch_size=4, pad=pad)[0]
    with torch.no_grad():
        nll, counts = sequence_nll(model, prepare_batch({**batch, "labels": batch["input_ids"]}))  # pads labelled
        expected = hf_sums(model, unpadded([batch]))
    assert counts.tolist() == [n for _, n in expected]
    torch.testing.assert_close(nll.double(), torch.stack([s for s, _ in expected]), rtol=1e-5, atol=1e-5)


def test_chunks_give_the_same_loss_and_gradients(monkeypatch):
    model = tiny_model("olmoe")
    batch = prepare_batch(make_batches(n_batches=1, batch_size=3, pad="mixed")[0])
    results = []
    for elements in (fmoe.calibration.loss.CHUNK_ELEMENTS, 3 * 128 * 2):  # whole, then two positions at a time
        monkeypatch.setattr(fmoe.calibration.loss, "CHUNK_ELEMENTS", elements)
        model.zero_grad()
        nll, _ = sequence_nll(model, batch)
        nll.sum().backward()
        results.append((nll.detach(), model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_evaluation_and_recovery_use_the_same_loss_and_ignore_padding():
    model = tiny_model("qwen2_moe")
    padded = make_batches(n_batches=1, batch_size=4, pad="mixed")[0]  # no labels: padding must not count
    with torch.no_grad():
        expected = hf_sums(model, unpadded([padded]))
    total, tokens = sum(s for s, _ in expected), sum(n for _, n in expected)
    evaluation = Evaluation(model, ("domain",))
    with torch.no_grad():
        evaluation.validation_step(padded, 0)
    torch.testing.assert_close(evaluation.nll[0].compute().double(), total, rtol=1e-5, atol=1e-5)
    assert int(evaluation.tokens[0].compute()) == tokens
    recovery = LoRARecovery(model, r=2, alpha=4)  # adapters start at zero: the base model's loss
    with pytest.warns(UserWarning, match="self.log"):
        loss = recovery.training_step(padded, 0)
    torch.testing.assert_close(loss.double(), total / tokens, rtol=1e-5, atol=1e-6)
