"""The GPU path: `python -m pytest -q -m cuda tests/test_cuda.py` runs the CUDA variants on a machine with a GPU (a few
minutes); without one they skip. Each comparison that also holds on CPU runs there too, in the default suite, so
the checks themselves are exercised everywhere."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fmoe
from fmoe.model.experts import experts_forward
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.calibration import grad_scaler
from fmoe.calibration.loss import prepare_batch, sequence_nll, targets
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_experts import cut, loop_forward
from tests.test_lightning import close, sequences, trainer

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOKENS = {"cpu": 24, "cuda": 4096}  # routed tokens per experts call: enough on a GPU to reach its grouped kernels
WIDTHS = {"uniform": [32] * 4, "ragged": [16, 32, 16, 32], "ragged off-grid": [8, 12, 4, 32]}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative to the largest value


def assert_near(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """Equal up to the dtype's tolerance, relative to the largest value."""
    tol = TOLERANCE[dtype]
    scale = float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * scale, msg=msg)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two flattened tensors."""
    ra, rb = (t.flatten().double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # stock layout; transposed, interleaved, biased
def test_grouped_forward_and_backward_match_the_loop(device, dtype, widths, family):
    """The grouped forward (grouped_mm where it runs, the per-group loop elsewhere) equals one expert at a time:
    outputs and the gradients of the input, routing weights and expert weights (fp16: GPUs without bf16, T4, V100)."""
    torch.manual_seed(0)
    module = cut(family, WIDTHS[widths], dtype).to(device)
    t = TOKENS[device]
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(t)]).to(device)
    weights = torch.rand(idx.shape, device=device, dtype=dtype, requires_grad=True)
    hidden = torch.randn(t, 64, device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn(t, 64, device=device, dtype=dtype)
    results = []
    for forward in (experts_forward, loop_forward):
        out = forward(module, hidden, idx, weights)
        results.append((out, torch.autograd.grad((out * probe).sum(), [hidden, weights, *module.parameters()])))
    (got, got_grads), (expected, expected_grads) = results
    assert expected.abs().sum() > 0
    assert_near(got, expected, dtype, "output")
    for i, (g, e) in enumerate(zip(got_grads, expected_grads, strict=True)):
        assert_near(g, e, dtype, f"gradient {i}")


def calibration_batches(device: str) -> list[dict]:
    return make_batches(n_batches=2, batch_size=4 if device == "cpu" else 16, seq_len=16 if device == "cpu" else 128)


@pytest.mark.parametrize("device", DEVICES)
def test_fisher_in_bf16_ranks_dims_as_fp32(device):
    """Fisher scores of the bf16 model (float32 hook products, accumulated sums) rank every module's dims as
    those of the fp32 model do, and their totals agree."""
    batches = calibration_batches(device)
    scores = {dtype: fmoe.score(tiny_model("qwen3_moe", dtype=dtype).to(device), batches)
              for dtype in (torch.float32, torch.bfloat16)}
    for name, exact in scores[torch.float32].tensors.items():
        rough = scores[torch.bfloat16].tensors[name]
        assert rank_correlation(rough, exact) > 0.95, name
        assert abs(float(rough.sum() / exact.sum()) - 1) < 0.05, name


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_mixed_calibration_fit_matches_fp32(device, tmp_path):
    """precision="16-mixed" (on CUDA: fp16 autocast with a real GradScaler; Lightning runs bf16 on CPU) gives the
    fp32 fit's Fisher scores up to mixed-precision rounding."""
    data = sequences(n=8 if device == "cpu" else 64, seq_len=12 if device == "cpu" else 128)
    scores = {}
    for precision in ("32-true", "16-mixed"):
        module = CalibrationModule(tiny_model("qwen3_moe"))
        fit = trainer(tmp_path, accelerator=device, precision=precision)
        fit.fit(module, DataLoader(data, batch_size=4 if device == "cpu" else 16))
        scores[precision] = module.scores
        if device == "cuda" and precision == "16-mixed":
            assert grad_scaler(fit) is not None
    close(scores["16-mixed"], scores["32-true"], rtol=0.1, of_max=0.01)


class WideVocabularyLM(nn.Module):
    """The smallest causal LM with a 152k vocabulary (Qwen's): embedding, one linear head."""

    def __init__(self, vocab: int = 152_064, hidden: int = 16, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, dtype=dtype)
        self.head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))  # [B, T, V]


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_nll_at_a_152k_vocabulary_matches_cross_entropy(device, monkeypatch):
    """The chunked NLL (chunks recomputed in the backward) equals one float32 cross-entropy over all logits, in
    value per sequence and in gradient, with padding; on CPU the chunks are made smaller so there are several."""
    if device == "cpu":
        monkeypatch.setattr("fmoe.calibration.loss.CHUNK_ELEMENTS", 2**21)
    b, t = (2, 24) if device == "cpu" else (4, 1024)
    torch.manual_seed(0)
    model = WideVocabularyLM().to(device)
    raw = make_batches(n_batches=1, batch_size=b, seq_len=t, vocab=152_064)[0]
    batch = prepare_batch(raw, torch.device(device))
    nll, counts = sequence_nll(model, batch)
    (grad,) = torch.autograd.grad(nll.sum(), [model.head.weight])
    logits = model(batch.input_ids).logits[:, :-1].float()  # [B, T-1, V]
    target = targets(batch)  # [B, T-1]
    reference = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none").sum(1)
    (reference_grad,) = torch.autograd.grad(reference.sum(), [model.head.weight])
    torch.testing.assert_close(counts, (target != -100).sum(1))
    torch.testing.assert_close(nll, reference, rtol=1e-5, atol=1e-3)
    assert_near(grad, reference_grad, torch.bfloat16)


def compiled_experts_matches_eager(device: str, dtype: torch.dtype, backend: str = "inductor") -> None:
    """torch.compile of the uniform experts forward (one graph) gives the eager outputs and input gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = cut("qwen3_moe", WIDTHS["uniform"], dtype).to(device)
    t = TOKENS[device]
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(t)]).to(device)
    weights = torch.rand(idx.shape, device=device, dtype=dtype)
    hidden = torch.randn(t, 64, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(experts_forward, fullgraph=True, backend=backend)  # the uniform forward never syncs
    results = []
    for forward in (experts_forward, compiled):
        out = forward(module, hidden, idx, weights)
        results.append((out, torch.autograd.grad(out.square().sum(), [hidden])[0]))
    (got, got_grad), (expected, expected_grad) = results[1], results[0]
    assert_near(got, expected, dtype, "output")
    assert_near(got_grad, expected_grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, backend", [("cpu", "eager"), pytest.param("cuda", "inductor", marks=CUDA)])
def test_compiled_uniform_experts_forward_matches_eager(device, backend, dtype):
    """One graph with no break, also where grouped_mm is chosen. On CPU only traced (backend "eager"): inductor
    holds there too (`compiled_experts_matches_eager("cpu", dtype)`) but compiles for ~20 s per dtype."""
    compiled_experts_matches_eager(device, dtype, backend)
