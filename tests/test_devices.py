"""Devices fmoe meets without a GPU here: one without float64 (Apple's MPS) and CUDA GPUs without grouped_mm (compute
capability below 8.0), each simulated on CPU through the one check that decides it (fmoe.model.compat)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

import fmoe
from fmoe.model import compat
from fmoe.model.experts import RaggedExperts
from fmoe.lightning.calibration import CalibrationModule
from fmoe.model.structure import apply_widths
from fmoe.calibration.gram import compensated
from fmoe.methods.dims.refit import refit
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_lightning import close, sequences, trainer


class NoFloat64(TorchFunctionMode):
    """Fails at the first operation that makes a float64 tensor, as a device without float64 would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
        if made:
            raise AssertionError(f"{getattr(func, '__name__', func)} made a float64 tensor")
        return out


def test_a_device_without_float64_calibrates_in_float32(tmp_path, monkeypatch):
    """With the CPU treated as a device without float64, a core calibration (scores and statistics) and a
    Lightning calibration fit with statistics and Gram sums, and a least-squares refit from those sums, run
    without making one float64 tensor; every sum is float32 and the scores are those of the float64 run."""
    model = tiny_model("qwen2_moe")
    data = sequences()
    reference = fmoe.score(model, [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)])
    monkeypatch.setattr(compat, "NO_FLOAT64_DEVICES", ("cpu",), raising=False)
    assert compat.accumulation_dtype("cpu") == torch.float32
    module = CalibrationModule(model, criterion="fisher", structure=True, gram=True)
    with NoFloat64():
        calibration = fmoe.calibrate(model, make_batches(), "fisher")
        trainer(tmp_path).fit(module, DataLoader(data, batch_size=4))
    state = module.scorer.state()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert any(k.startswith("structure/") for k in state) and any(k.startswith("gram/") for k in state)
    close(module.scores, reference)
    assert calibration.statistics is not None and module.statistics is not None
    plan = fmoe.make_plan(module.scores, 0.5, multiple_of=4)  # host-side planning may use float64
    with NoFloat64():
        compensated(module.gram)
        refit(fmoe.prune(model, plan), plan, module.gram)  # least-squares solves on the device


def test_grouped_mm_needs_compute_capability_8_read_once_per_device(monkeypatch):
    """CUDA devices below compute capability 8.0 (T4, V100) take the per-group loop; each device's capability is
    read once; under torch.compile only bf16 takes grouped_mm (its compiled form takes nothing else)."""
    reads = []
    capabilities = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: reads.append(i) or capabilities[i])
    monkeypatch.setattr(compat, "_CUDA_CAPABILITY", {}, raising=False)
    for _ in range(2):
        assert not compat.grouped_mm_supported(torch.device("cuda", 0), torch.bfloat16)
        assert compat.grouped_mm_supported(torch.device("cuda", 1), torch.bfloat16)
    assert reads == [0, 1]
    assert compat.grouped_mm_supported(torch.device("cpu"), torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def choices(x):  # traced: each choice is a constant of the graph
        flags = [compat.grouped_mm_supported(torch.device(d), x.dtype) for d in ("cuda:0", "cuda:1", "cpu")]
        return x + sum(int(flag) << i for i, flag in enumerate(flags))

    torch._dynamo.reset()
    assert choices(torch.zeros(1, dtype=torch.bfloat16)).tolist() == [0b110]
    assert choices(torch.zeros(1)).tolist() == [0]
    assert reads == [0, 1]


def test_a_device_without_grouped_mm_scores_and_runs_ragged_experts_through_the_loop(monkeypatch):
    """Where grouped_mm cannot run, scoring and a ragged forward never call it and give what it gives."""
    model = tiny_model("qwen3_moe")
    batches = make_batches()
    names = list(fmoe.find_experts(model))
    widths = {names[0]: [torch.arange(w) for w in (16, 32, 16, 32)]}

    def run():
        scores = fmoe.score(model, batches)
        ragged = tiny_model("qwen3_moe")
        apply_widths(ragged, widths)
        assert isinstance(fmoe.find_experts(ragged)[names[0]], RaggedExperts)
        return scores, ragged(**batches[0]).logits

    expected_scores, expected_logits = run()
    monkeypatch.setattr(compat, "grouped_mm_supported", lambda device, dtype: False, raising=False)

    def refused(*args, **kwargs):
        raise RuntimeError("grouped_mm is not supported on this device")

    monkeypatch.setattr(compat, "_GROUPED_MM", refused)
    scores, logits = run()
    close(scores, expected_scores, rtol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
