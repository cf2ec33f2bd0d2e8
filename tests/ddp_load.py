"""Two processes loading one checkpoint, run by tests/test_loading.py; each rank writes OUT_DIR/rank{r}.json and
its state dict to OUT_DIR/rank{r}.safetensors:

    RANK=r WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python tests/ddp_load.py OUT_DIR load CHECKPOINT
        # fmoe.checkpoint.load_distributed in a gloo process group
    python tests/ddp_load.py OUT_DIR lightning CHECKPOINT
        # a 2-process DDP calibration of fmoe.lightning.sharding.load_model(CHECKPOINT), as the recipe loads

Each rank records whether it opened a weights file (an audit hook sees every Python open; calls of
fmoe.checkpoint.from_pretrained are counted too), so a rank that read the checkpoint cannot go unnoticed.
"""

import json
import re
import sys
from pathlib import Path

import torch.distributed as dist

import fmoe
import fmoe.checkpoint

OPENED: list[str] = []
WATCH = [True]


def _audit(event, args):
    if WATCH[0] and event == "open" and str(args[0]).endswith(".safetensors"):
        OPENED.append(str(args[0]))


def _counted(load):
    def call(*args, **kwargs):
        if WATCH[0]:
            OPENED.append(f"from_pretrained({args[0]})")
        return load(*args, **kwargs)
    return call


sys.addaudithook(_audit)
fmoe.checkpoint.from_pretrained = _counted(fmoe.checkpoint.from_pretrained)  # load_distributed's own call


def save_state(model, path: Path) -> None:
    """The state dict as loaded (tied names saved twice: transformers' own save writes on rank 0 only)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def load(out: Path, checkpoint: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fmoe.checkpoint.empty_model(checkpoint)  # imports and one empty build, outside the measurement
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    seen = {}
    broadcast = fmoe.checkpoint.broadcast_weights

    def watched(model):
        seen["meta"] = fmoe.checkpoint.on_meta(model)
        seen["growth"] = status("VmHWM") - before
        return broadcast(model)

    fmoe.checkpoint.broadcast_weights = watched
    model = fmoe.checkpoint.load_distributed(checkpoint)
    peak = status("VmHWM") - before
    WATCH[0] = False
    save_state(model, out / f"rank{rank}.safetensors")
    result = {"weights_opened": bool(OPENED), "meta_before_broadcast": seen["meta"],
              "growth_before_broadcast": seen["growth"], "peak": peak,
              "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def lightning(out: Path, checkpoint: str) -> None:
    from torch.utils.data import DataLoader

    from fmoe.lightning import CalibrationModule
    from fmoe.lightning.sharding import load_model
    from tests.ddp_calibrate import two_cpus
    from tests.test_lightning import sequences

    model = load_model(checkpoint)  # the child Lightning launches (LOCAL_RANK=1, WORLD_SIZE=2) builds it empty
    meta_at_init = fmoe.checkpoint.on_meta(model)
    module = CalibrationModule(model)
    trainer = two_cpus(strategy="ddp", max_epochs=1)
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    WATCH[0] = False
    rank = trainer.global_rank
    save_state(module.model, out / f"rank{rank}.safetensors")
    result = {"weights_opened": bool(OPENED), "meta_at_init": meta_at_init, "fingerprint": module.scorer.fingerprint}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    {"load": load, "lightning": lightning}[kind](out, *sys.argv[3:])
    if dist.is_initialized():  # closed before exit: left to interpreter exit, gloo's threads can abort the process
        dist.barrier()
        dist.destroy_process_group()
