"""A checkpoint to a pruned checkpoint without ever holding the model (`fmoe prune-checkpoint`).

    fmoe prune-checkpoint SRC --plan plan.json --out DST                         # a saved plan, applied out of core
    fmoe prune-checkpoint SRC --calibration data.jsonl --method fisher --amount 0.5 --out DST
    fmoe prune-checkpoint SRC --calibration data.jsonl --method reap --amount 0.25 --out DST --device cuda --chunk 64
    fmoe prune-checkpoint fmoe/toy/assets/toy_moe --out /tmp/toy-pruned --method fisher --amount 0.5 \\
        --calibration ~/.cache/fmoe/toy_corpus-20000-200-120-0/arithmetic/train.jsonl --pack false --seq_len 80  # CPU

With `--calibration`: streamed calibration (fmoe.calibration.streamed: one decoder layer resident at a time, Fisher
exact), a plan of `--method` (any compression method of fmoe.methods.registry, or a dim criterion, meaning `dims`
scored by it), and the out-of-core edit (fmoe.methods.offline). The work directory (`--work_dir`, default DST.work)
holds the sweep's boundaries and sums, then the calibration: a run stopped at any point and started again with the
same arguments continues from the last finished layer, or from the saved calibration (one with other arguments
starts afresh). It is removed once DST is written; DST appears only complete, and the plan is saved beside it
(DST.plan.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jsonargparse import auto_cli

from ..calibration.criteria import CRITERIA
from ..calibration.scores import Scores
from ..calibration.statistics import Statistics
from ..lightning.data import TextDataModule
from ..methods import offline, registry
from ..model.checkpoint import empty_model

FORWARD_ONLY = "activation"  # the pass of methods that read no gradient: the statistics come with any criterion


def main(src: Path, out: Path | None = None, plan: Path | None = None, calibration: str | None = None,
         method: str = "dims", amount: float | None = None, criterion: str | None = None, scope: str | None = None,
         count: int | None = None, options: dict | None = None, text_field: str = "text", template: str | None = None,
         seq_len: int = 256, samples: int = 128, batch_size: int = 4, pack: bool = True, seed: int = 0,
         chunk: int | None = None, device: str | None = None, dtype: str = "auto", work_dir: Path | None = None,
         max_shard_size: str | None = None) -> Path:
    """Prune checkpoint `src` into `out`, never loading the model.

    Args:
        src: model directory (config.json + safetensors, single file or sharded).
        out: output directory (written only once complete).
        plan: a saved fmoe plan to apply (instead of calibrating).
        calibration: calibration texts: a local json/jsonl/parquet/txt/csv file (or a hub dataset name).
        method: a compression method (dims, expert_drop, reap, expert_frequency, expert_fisher, layer_drop,
            block_drop) or a dim criterion (fisher, activation, router, ...: dims scored by it).
        amount: the share of routed expert parameters removed.
        criterion: the calibration pass's dim criterion (default: the method's, fisher for dims).
        scope: dims: expert | layer | global; expert drops: layer | global.
        count: experts, layers or blocks to drop (instead of amount).
        options: further options of the method's planner, e.g. {"multiple_of": 32}.
        text_field: the field of each record that holds its text.
        template: builds each text from several fields instead, e.g. "Q: {question} A: {answer}".
        seq_len: tokens per calibration sequence.
        samples: calibration sequences, drawn with `seed`.
        batch_size: sequences per forward.
        pack: join documents into full sequences; false: one document per row, padded.
        seed: the seed that draws the sequences.
        chunk: sequences per sweep (bounds the boundary states kept; default all).
        device: where each layer runs (e.g. cuda); default the CPU.
        dtype: the dtype the layers run in ("auto": the checkpoint's).
        work_dir: where the sweep and the calibration are kept until `out` is written (default OUT.work).
        max_shard_size: output shard size, e.g. 5GB (default: the largest source shard).
    """
    if out is None:
        raise ValueError("--out names the output directory")
    if (plan is None) == (calibration is None):
        raise ValueError("give either --plan (a saved plan) or --calibration (data to calibrate on)")
    if plan is not None:
        return _write(src, registry.load_plan(plan), out, max_shard_size)
    name, criterion = _method(method, criterion)
    chosen = {**(options or {}), **{k: v for k, v in (("scope", scope), ("count", count)) if v is not None}}
    registry.check(name, amount, **chosen)  # before any calibration is spent
    work = Path(work_dir) if work_dir is not None else Path(f"{out}.work")
    run = {"src": str(Path(src).resolve()), "calibration": calibration, "criterion": criterion,
           "text_field": text_field, "template": template, "seq_len": seq_len, "samples": samples,
           "batch_size": batch_size, "pack": pack, "seed": seed, "chunk": chunk, "dtype": dtype}
    _claim(work, run)
    measured = _load_calibration(work)
    if measured is None:
        data = (calibration, text_field, template, seq_len, samples, batch_size, pack, seed)
        measured = _calibrate(src, data, criterion, name, chunk, work / "sweep", device, dtype)
        _save_calibration(work, measured)
    planned = registry.make(empty_model(src), name, amount, measured, **registry.options_of(name, chosen))
    plan_path = Path(f"{out}.plan.json")
    planned.save(plan_path)
    print(f"plan: {name}, achieved {json.dumps(planned.meta.get('achieved'))} ({plan_path})")
    written = _write(src, planned, out, max_shard_size)
    shutil.rmtree(work)
    return written


def _claim(work: Path, run: dict) -> None:
    """Make `work` this run's: what a run with the same arguments left there is kept (it resumes); what a run
    with other arguments left is discarded."""
    record = work / "run.json"
    if record.is_file() and json.loads(record.read_text()) != run:
        print(f"discarding {work}: it holds a run with other arguments")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run))


def _calibrate(src, data: tuple, criterion: str, name: str, chunk, sweep: Path, device, dtype) -> registry.Calibration:
    """The streamed calibration method `name` plans from, over the batches `data` describes (none for a method
    that reads nothing)."""
    if not registry.method(name).reads:
        return registry.Calibration()
    batches = _batches(src, *data)
    print(f"calibrating ({criterion}, streamed) on {sum(len(b['input_ids']) for b in batches)} sequences")
    return registry.calibrate(src, batches, criterion, streamed=True, chunk=chunk, offload_dir=sweep, device=device,
                              dtype=dtype)


def _method(method: str, criterion: str | None) -> tuple[str, str]:
    """(registered method, the pass's criterion) of `--method` and `--criterion`."""
    if method in CRITERIA:
        if criterion is not None and criterion != method:
            raise ValueError(f"--method {method} scores dims with {method!r}; --criterion {criterion!r} contradicts it")
        return "dims", method
    registry.method(method)  # an unknown name lists the valid ones
    return method, criterion or ("fisher" if method in ("dims", "expert_fisher") else FORWARD_ONLY)


def _batches(src, calibration, text_field, template, seq_len, samples, batch_size, pack, seed) -> list[dict]:
    """The calibration batches: the texts tokenized with the checkpoint's tokenizer (fmoe.lightning.data)."""
    data = TextDataModule(str(src), calibration, text_field=text_field, template=template, seq_len=seq_len,
                          n_samples=samples, batch_size=batch_size, pack=pack, seed=seed)
    data.setup("fit")
    return list(data.train_dataloader())


def _load_calibration(work: Path) -> registry.Calibration | None:
    """The calibration this run finished before it stopped, if any."""
    done = work / "calibration"
    if not (done / "complete").is_file():
        return None
    print(f"calibration: reusing {done}")
    scores = Scores.load(done / "scores") if (done / "scores").is_dir() else None
    statistics = Statistics.load(done / "statistics") if (done / "statistics").is_dir() else None
    return registry.Calibration(scores, statistics)


def _save_calibration(work: Path, measured: registry.Calibration) -> None:
    done = work / "calibration"
    (done / "complete").unlink(missing_ok=True)
    if measured.scores is not None:
        measured.scores.save(done / "scores")
    if measured.statistics is not None:
        measured.statistics.save(done / "statistics")
    (done / "complete").touch()  # last: a calibration without it is not reused


def _write(src: Path, plan, out: Path, max_shard_size: str | None) -> Path:
    written = offline.edit_checkpoint(src, plan, out, max_shard_size)  # any plan, out of core
    print(f"wrote {written}")
    return written


def cli(args: list[str] | None = None) -> None:
    auto_cli(main, args=args)


if __name__ == "__main__":
    cli()
