import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "FMOE_CACHE" not in os.environ:  # the generated toy corpus goes to a per-run directory, not ~/.cache
    import tempfile

    os.environ["FMOE_CACHE"] = tempfile.mkdtemp(prefix="fmoe-cache-")
warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

from fmoe.toy.tiny import tiny_model

ROOT = Path(__file__).parent.parent


def _status(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def resident_peak(run) -> int:
    """Bytes the resident set grew by at its peak while `run()` ran (Linux: VmHWM reset to VmRSS through
    /proc/self/clear_refs before, read after)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    run()
    return _status("VmHWM") - before


def peak_in_child(script: str, *args, timeout: float = 300) -> int:
    """The peak growth a fresh Python process running `script` (with `args`) prints last, as {"growth": bytes}
    (`resident_peak`). glibc's mmap threshold is pinned at 64 KiB: by default it adapts up to 32 MiB, so freed
    tensors of a few MiB stay in its heap and the measure would show the allocator's retention, not the program's
    (tensors of real models, above 32 MiB, are mapped and unmapped anyway)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["growth"]


def bytes_by_layer(directory) -> dict[str, int]:
    """{decoder layer ("model.layers.3"), or "" for every tensor outside the layers: bytes} of a checkpoint."""
    from fmoe.model.checkpoint import read_header

    out: dict[str, int] = {}
    for path in Path(directory).glob("*.safetensors"):
        for key, (_, _, start, stop) in read_header(path)[0].items():
            group = ".".join(key.split(".")[:3]) if key.startswith("model.layers.") else ""
            out[group] = out.get(group, 0) + stop - start
    return out


def make_batches(n_batches=2, batch_size=3, seq_len=12, vocab=128, seed=0, pad="mixed"):
    """Random token batches with sequences of different lengths, padded left/right/mixed (or "none": full)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        for i in range(batch_size if pad != "none" else 0):
            length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen))
            left = pad == "left" or (pad == "mixed" and i % 2 == 1)
            if left:
                mask[i, : seq_len - length] = 0
            else:
                mask[i, length:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def unpadded(batches):
    """Every sequence of `batches` alone, without padding (a list of [1, L] batches)."""
    return [{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()].unsqueeze(0)}
            for b in batches for i in range(b["input_ids"].shape[0])]


def overflow_then_rerun(scorer, batches):
    """Scorer steps as a CalibrationModule runs them under fp16: batches[0] with overflowing gradients (the step is
    dropped), the same batch again at a finite scale, then batches[1]."""
    with scorer.attached():
        scorer.gradient_scale = float("inf")  # every gradient overflows: the step is dropped, as under fp16
        assert scorer.step(batches[0], skip_non_finite=True) is None
        scorer.gradient_scale = 1.0
        scorer.step(batches[0], skip_non_finite=True)  # the same batch again, as CalibrationModule runs it
        scorer.step(batches[1], skip_non_finite=True)
    return scorer


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture(params=["qwen2_moe", "gpt_oss"])
def model(request):
    return tiny_model(request.param)
