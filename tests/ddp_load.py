"""Two processes loading one checkpoint, run by tests/test_loading.py; each rank writes OUT_DIR/rank{r}.json and
its state dict to OUT_DIR/rank{r}.safetensors:

    RANK=r WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python tests/ddp_load.py OUT_DIR load CHECKPOINT
        # fmoe.model.checkpoint.load_distributed in a gloo process group
    python tests/ddp_load.py OUT_DIR lightning CHECKPOINT
        # a 2-process DDP calibration of fmoe.lightning.sharding.load_model(CHECKPOINT), as the recipe loads
    python tests/ddp_load.py OUT_DIR stages CHECKPOINT WARMUP_CHECKPOINT
        # calibrate -> prune -> LoRA -> validate -> merge -> export of load_model(CHECKPOINT) under FSDP2, then
        # under DDP; each rank records whether its plain model was empty (meta) before and after every stage and
        # the peak memory growth of the FSDP2 stages; OUT_DIR/{fsdp2,ddp}/ get scores, plans and the export

Each rank records whether it opened a weights file (an audit hook sees every Python open; calls of
fmoe.model.checkpoint.from_pretrained are counted too), so a rank that read the checkpoint cannot go unnoticed.
"""

import json
import re
import sys
from pathlib import Path

import torch.distributed as dist

import fmoe
import fmoe.model.checkpoint

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
fmoe.model.checkpoint.from_pretrained = _counted(fmoe.model.checkpoint.from_pretrained)  # load_distributed's own call


def save_state(model, path: Path) -> None:
    """The state dict as loaded (tied names saved twice: transformers' own save writes on rank 0 only)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def load(out: Path, checkpoint: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fmoe.model.checkpoint.empty_model(checkpoint)  # imports and one empty build, outside the measurement
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    seen = {}
    broadcast = fmoe.model.checkpoint.broadcast_weights

    def watched(model):
        seen["meta"] = fmoe.model.checkpoint.on_meta(model)
        seen["growth"] = status("VmHWM") - before
        return broadcast(model)

    fmoe.model.checkpoint.broadcast_weights = watched
    model = fmoe.model.checkpoint.load_distributed(checkpoint)
    peak = status("VmHWM") - before
    WATCH[0] = False
    save_state(model, out / f"rank{rank}.safetensors")
    result = {"weights_opened": bool(OPENED), "meta_before_broadcast": seen["meta"],
              "growth_before_broadcast": seen["growth"], "peak": peak,
              "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def lightning(out: Path, checkpoint: str) -> None:
    from torch.utils.data import DataLoader

    from fmoe.lightning.calibration import CalibrationModule
    from fmoe.lightning.sharding import load_model
    from tests.ddp_calibrate import two_cpus
    from tests.test_lightning import sequences

    model = load_model(checkpoint)  # the child Lightning launches (LOCAL_RANK=1, WORLD_SIZE=2) builds it empty
    meta_at_init = fmoe.model.checkpoint.on_meta(model)
    module = CalibrationModule(model)
    trainer = two_cpus(strategy="ddp", max_epochs=1)
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    WATCH[0] = False
    rank = trainer.global_rank
    save_state(module.model, out / f"rank{rank}.safetensors")
    result = {"weights_opened": bool(OPENED), "meta_at_init": meta_at_init, "fingerprint": module.scorer.fingerprint}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


class Probe:
    """Whether a rank's plain model is empty (meta) before and after each stage, and with `measure` its peak memory
    growth over the stages, LoRA's training steps left out: there peft materialises each expert's W + BA for the
    backward, activation memory that every rank needs whatever holds the weights."""

    def __init__(self, measure: bool = False):
        self.meta, self.peak, self.base = {}, 0, None
        if measure:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = status("VmRSS")

    def record(self, stage: str, model) -> None:
        self.meta[stage] = fmoe.model.checkpoint.on_meta(model)

    def pause(self) -> None:
        if self.base is not None:
            self.peak = max(self.peak, status("VmHWM") - self.base)

    def resume(self) -> None:
        if self.base is not None:
            Path("/proc/self/clear_refs").write_text("5")


def run_stages(out: Path, checkpoint: str, strategy, probe: Probe) -> int:
    """calibrate -> prune -> LoRA -> validate -> merge -> export of load_model(checkpoint) under `strategy` (a
    factory); rank 0 writes the plan, scores and export to `out`, every rank its plan."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from fmoe.lightning.calibration import CalibrationModule
    from fmoe.lightning.callbacks import IntermediatePruning
    from fmoe.lightning.recovery import LoRARecovery
    from fmoe.lightning.sharding import load_model, plain
    from tests.ddp_calibrate import two_cpus
    from tests.test_lightning import sequences

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):  # the plain model a sharded fit keeps aside (sharding.shard)
            probe.record(f"{type(pl_module).__name__} {trainer.state.fn}", plain(pl_module))

        on_validation_start = on_train_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if isinstance(pl_module, LoRARecovery) and batch_idx == 0:
                probe.pause()

        def on_train_end(self, trainer, pl_module):
            if isinstance(pl_module, LoRARecovery):
                probe.resume()

    module = CalibrationModule(load_model(checkpoint))
    probe.record("loaded", module.model)
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out)
    trainer = two_cpus(strategy=strategy(), max_epochs=1, callbacks=[pruning, Watch()])
    trainer.fit(module, DataLoader(sequences(n=4), batch_size=2))
    probe.record("pruned", module.model)
    rank = trainer.global_rank
    pruning.plan.save(out / f"plan_rank{rank}.json")
    L.seed_everything(0)  # the same adapters under both strategies (FSDP2 ranks take rank 0's)
    recovery = LoRARecovery(module.model, r=4, alpha=8, lr=1e-2, eval_names=("domain",))
    probe.record("peft", recovery.model)
    two_cpus(strategy=strategy(), max_steps=2, callbacks=[Watch()]).fit(
        recovery, DataLoader(sequences(n=8, seed=3, padded=False), batch_size=2))
    probe.record("recovered", recovery.model)
    held_out = DataLoader(sequences(n=4, seed=4, padded=False), batch_size=2)
    ppl = two_cpus(strategy=strategy(), callbacks=[Watch()]).validate(recovery, held_out, verbose=False)
    probe.record("validated", recovery.model)
    merged = recovery.merged()
    probe.record("merged", merged)
    if rank == 0:
        fmoe.save_pretrained(merged, out / "export")
        (out / "ppl.json").write_text(json.dumps(ppl[0]))
    return rank


def stages(out: Path, checkpoint: str, warmup: str) -> None:
    """`run_stages` under FSDP2 (measured, after one run over the small `warmup` checkpoint that pays for imports,
    the process group and first calls), then under DDP."""
    from tests.ddp_calibrate import fsdp2

    for name in ("warmup", "fsdp2", "ddp"):
        (out / name).mkdir(exist_ok=True)
    rank = run_stages(out / "warmup", warmup, fsdp2, Probe())
    probe = Probe(measure=True)
    run_stages(out / "fsdp2", checkpoint, fsdp2, probe)
    probe.pause()
    run_stages(out / "ddp", checkpoint, lambda: "ddp", Probe())
    WATCH[0] = False
    (out / f"rank{rank}.json").write_text(json.dumps({"meta": probe.meta, "peak": probe.peak,
                                                      "weights_opened": bool(OPENED)}))


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    {"load": load, "lightning": lightning, "stages": stages}[kind](out, *sys.argv[3:])
    if dist.is_initialized():  # closed before exit: left to interpreter exit, gloo's threads can abort the process
        dist.barrier()
        dist.destroy_process_group()
