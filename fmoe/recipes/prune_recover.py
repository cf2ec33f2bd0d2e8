"""Calibrate -> prune -> recover -> evaluate -> export a transformers MoE (LightningCLI; every stage switchable).

    fmoe prune-recover                                   # the shipped toy MoE: CPU, no network, about a minute
    fmoe prune-recover --prune.amount 0.25 --prune.scope expert --recover.max_steps 50
    fmoe prune-recover --prune.amount 0.75 --prune.steps 5  # iterative: the partly pruned model scored again each step
    fmoe prune-recover --prune.amount 0.75 --prune.reconstruct true  # least-squares refit of the kept dims
    fmoe prune-recover --model.criterion 'rank_mean(compensated, router)'  # the dims' scoring criterion
    fmoe prune-recover --config recipes/configs/qwen1.5-moe-a2.7b.yaml   # 8x80 GB, real checkpoint
    fmoe prune-recover --prune.method reap --prune.amount 0.25  # or expert_drop, layer_drop, block_drop, ...
    fmoe prune-recover --lm_eval.tasks '[gsm8k, arc_easy]' --lm_eval.limit 200  # lm-eval scores in every row
    fmoe prune-recover --recover.distill true --recover.kd_weight 0.5  # LoRA learns the dense model's distributions
    fmoe prune-recover --recover.distill true --recover.teacher cached --recover.kd_weight 0.5  # top-64 logits
    fmoe prune-recover --recover.tune_experts true --recover.r 0 --recover.lr 1e-3  # the routed experts themselves
    fmoe prune-recover --help                            # or: python recipes/prune_recover.py ...

Stages: calibrate (a CalibrationModule fit that accumulates dim scores and, for the methods that plan from them,
expert and layer statistics), prune (`--prune.method`, any of fmoe.methods.METHODS, planned and applied at its end
by a Compression callback), recover (LoRA via peft, merged back, or the routed experts' own weights; compressed
experts also train their vectors; on the data loss or, with `--recover.distill`, on a mix with the KL to the dense
model's next-token distributions: the dense checkpoint read again as a live teacher, or its logits cached by rank 0
before pruning, see fmoe.recovery.distill), evaluate (perplexity of each eval set before and after, and exact-match accuracy
of each `tasks` file), export (fmoe.save_pretrained + results.json; report.png next to plan.json). With
`--lm_eval.tasks` every row also gets lm-evaluation-harness scores, computed on rank 0 only (lm-eval runs in the
process on one device; the other ranks wait at a barrier). Each stage logs to a CSVLogger of its own,
<default_root_dir>/logs/<stage> (calibrate, recover, evaluate_dense, evaluate_pruned, evaluate_recovered), unless
`--trainer.logger` says otherwise; the run's resolved config goes to <default_root_dir>/config.yaml, which
`--config` takes to run it again. The console shows each stage's header, progress bar and result (fmoe.console;
`--verbose`: every library's messages too), and at the end a before/after table (total and active parameters,
weight bytes, metrics). Every `--trainer.*` option reaches every stage's Trainer
(fresh callbacks, logger, strategy and plugins each time); `accumulate_grad_batches` and `gradient_clip_*` apply to
the LoRA stage only, since a calibration steps no weights, and the LoRA stage runs `--recover.max_steps` steps
whatever `--trainer.max_epochs` says (its max_epochs is the epochs those steps take). The default compresses fmoe's
toy MoE (fmoe/toy/assets/toy_moe) into an arithmetic specialist: calibrated and recovered on arithmetic word problems,
measured on arithmetic, facts and general reading.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import fmoe
from fmoe import console, evaluation, methods, toy
from fmoe.calibration.criteria import scorer_criterion
from fmoe.evaluation.report import write_report
from fmoe.evaluation.tasks import load_tasks
from fmoe.io import atomic_write_text, write_json
from fmoe.lightning.calibration import CalibrationModule, check_strategy
from fmoe.lightning.callbacks import Compression, IntermediatePruning
from fmoe.lightning.data import TextDataModule
from fmoe.lightning.recovery import LoRARecovery, epochs_for, evaluate
from fmoe.lightning.sharding import load_model, process_rank
from fmoe.methods.dims.refit import LAM
from fmoe.recovery.distill import cache_teacher, check_options
from fmoe.serving.vllm import serve_command


@dataclass
class Stages:
    """The stages that run.

    Attributes:
        calibrate: score the model over the calibration set (a CalibrationModule fit).
        prune: plan and apply the compression (--prune.*).
        recover: train the compressed model back (--recover.*).
        evaluate: measure perplexity and task accuracy before and after each stage.
        export: save the final model and results.json to --export_dir.
    """

    calibrate: bool = True
    prune: bool = True
    recover: bool = True
    evaluate: bool = True
    export: bool = True


@dataclass
class Prune:
    """What the prune stage removes, and how much.

    Attributes:
        method: the compression method (fmoe.methods.METHODS).
        amount: the share removed: of routed intermediate dims (dims), of routed parameters (the others).
        scope: where the removal is ranked: expert, layer or global (dims); layer or global (expert drops).
        multiple_of: dims: kept widths are multiples of this (aligned grouped matmuls).
        min_width: dims: the least width an expert keeps (null: multiple_of).
        normalize: global scope: mean divides each layer's scores by their mean first; none compares them raw.
        max_widths: dims: distinct widths per layer (one grouped matmul each); null: unbounded.
        count: expert, layer and block drops: how many to drop, instead of an amount.
        mode: block_drop: discrete (the most redundant blocks) or consecutive (the best window of blocks).
        steps: dims: remove the amount in this many steps, scoring the partly pruned model again before each.
        reconstruct: dims: refit the kept dims' down projections by least squares (fmoe.reconstruct).
        lam: the refit's ridge towards the pruned weights, in pseudo-tokens per kept dim.
    """

    method: Literal[tuple(methods.METHODS)] = "dims"  # the registry's names when the parser is built
    amount: float = 0.5
    scope: str = "layer"
    multiple_of: int = 16
    min_width: int | None = None
    normalize: str = "mean"
    max_widths: int | None = 4
    count: int | None = None
    mode: str = "discrete"
    steps: int = 1
    reconstruct: bool = False
    lam: float = LAM


@dataclass
class Recover:
    """How the recover stage trains the compressed model (LoRA via peft, merged back at the end).

    Attributes:
        r: LoRA rank (0: no adapters, with tune_experts or compressed experts' vectors).
        alpha: LoRA alpha (the adapters' scale is alpha / r).
        lr: learning rate.
        max_steps: training steps.
        val_check_interval: steps between two evaluations of the eval sets.
        experts: adapt the routed experts too (not only attention and shared experts).
        tune_experts: train the routed experts' own weights instead (r: adapters elsewhere; 0: none).
        distill: learn the dense model's next-token distributions too (fmoe.recovery.distill).
        temperature: the distillation temperature T.
        kd_weight: loss = kd_weight * T^2 * KL(dense || pruned) + (1 - kd_weight) * NLL(data).
        teacher: live (the dense model runs beside the student, sharded like it under FSDP2) or cached (its logits,
            computed before pruning).
        top_k: cached teacher: logits kept per position (null: all of them, for small vocabularies).
    """

    r: int = 16
    alpha: int = 32
    lr: float = 2e-4
    max_steps: int = 60
    val_check_interval: int = 30
    experts: bool = True
    tune_experts: bool = False
    distill: bool = False
    temperature: float = 1.0
    kd_weight: float = 1.0
    teacher: str = "live"
    top_k: int | None = 64


@dataclass
class LMEval:
    """lm-evaluation-harness scores in every row (rank 0 runs them).

    Attributes:
        tasks: lm-eval task names (e.g. [gsm8k, arc_easy]); null: fmoe_arithmetic for the toy model when lm-eval
            is installed, none otherwise; []: no lm-eval run.
        limit: records per task (a float below 1: a share of them).
        include_path: a directory of extra task YAMLs (fmoe.toy.toy_tasks_dir() for the toy).
    """

    tasks: list[str] | None = None
    limit: int | float | None = None
    include_path: str | None = None


def calibration(model: str = "toy", criterion: str = "fisher", dtype: str = "float32") -> CalibrationModule:
    """The model to compress, wrapped for calibration (a CalibrationModule).

    Read once per run: in a multi-process run only rank 0 reads it, the others receive it in their first stage (see
    load_model).

    Args:
        model: a transformers checkpoint (hub name or directory); toy: fmoe's shipped toy MoE.
        criterion: the scoring criterion: fisher, activation, router, magnitude, random, compensated, or a
            combination such as "rank_mean(compensated, router)".
        dtype: the torch dtype the model is loaded in (float32, bfloat16, float16).
    """
    scorer_criterion(criterion)  # a bad criterion fails before the model is read
    console.header("load", f"{checkpoint_of(model)} in {dtype}")
    return CalibrationModule(load_model(checkpoint_of(model), dtype=getattr(torch, dtype)), criterion=criterion)


def checkpoint_of(model: str) -> str:
    return str(toy.TOY_DIR) if model == "toy" else model


# options under an earlier name: taken with a warning, as their name now
RENAMED_OPTIONS = {"--model.method": "--model.criterion", "--prune.ratio": "--prune.amount"}


def renamed_options(args: list[str]) -> list[str]:
    """`args` with each option of RENAMED_OPTIONS (`--old value` or `--old=value`) spelled as now, with a
    FutureWarning (a deprecation shown to the command's users)."""
    spelled = []
    for arg in args:
        old, equals, value = arg.partition("=")
        if old in RENAMED_OPTIONS:
            rank_zero_warn(f"{old} is deprecated: use {RENAMED_OPTIONS[old]}", category=FutureWarning)
            arg = RENAMED_OPTIONS[old] + equals + value
        spelled.append(arg)
    return spelled


def settle_defaults(parser, defaults: dict) -> None:
    """parser.set_defaults, and the options given a default are no longer shown as required."""
    parser.set_defaults(defaults)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False


class RecipeCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self.console = ExitStack()  # the console filters from the parsed options on; main closes it
        try:
            # the recipe makes its own optimizers (LoRARecovery): no --optimizer or --lr_scheduler
            super().__init__(*args, auto_configure_optimizers=False, **kwargs)
        except BaseException:
            self.console.close()
            raise

    def init_parser(self, **kwargs):
        return super().init_parser(**{"description": __doc__.splitlines()[0], **kwargs})

    def parse_arguments(self, parser, args):
        """Parse (an option under an earlier name as RENAMED_OPTIONS says), then filter the console
        (fmoe.console.quiet) unless --verbose: seeding and the first Trainer follow at once."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            self.config = parser.parse_args(renamed_options(sys.argv[1:] if args is None else args))
        self.console.enter_context(console.quiet(self.config.verbose))

    def add_arguments_to_parser(self, parser):
        parser.add_class_arguments(Stages, "stages")
        parser.add_class_arguments(Prune, "prune")
        parser.add_class_arguments(Recover, "recover")
        parser.add_class_arguments(LMEval, "lm_eval")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="where the compressed model goes (default: <trainer.default_root_dir>/export)")
        files = toy.corpus_files()  # generated once into ~/.cache/fmoe (FMOE_CACHE)
        parser.add_argument("--tasks", type=dict[str, str] | None, default=None,
                            help="{name: jsonl of prompt/answer records}: exact-match accuracy per stage "
                                 "(default: every toy corpus domain's test split for the toy model, none otherwise)")
        parser.add_argument("--task_limit", type=int, default=100, help="records per task file")
        parser.add_argument("--verbose", type=bool, nargs="?", const=True, default=False,
                            help="show every message of the libraries a run drives; by default the console shows "
                                 "each stage's header, progress bar and result (see fmoe.console)")
        settle_defaults(parser, {"data.tokenizer": str(toy.TOY_DIR), "data.train": str(files["arithmetic"]["train"]),
                                 "data.domain_eval": str(files["arithmetic"]["test"]),
                                 "data.general_eval": str(files["general"]["test"]),
                                 "data.seq_len": 80, "data.pack": False, "data.n_samples": 64, "data.batch_size": 8,
                                 "trainer.max_epochs": 1, "trainer.enable_checkpointing": False,
                                 "trainer.enable_model_summary": False,
                                 "trainer.default_root_dir": "runs/prune_recover"})


# options a calibration fit cannot take: it steps no weights (Lightning refuses them under manual optimization)
TRAINING_ONLY = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


def fresh(value):
    """A new instance of a class_path/init_args config value (callbacks, logger, strategy, plugins, profiler belong
    to one Trainer each), a copy of an object given to main(), the value itself otherwise."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and "class_path" in value:
        return instantiate_class((), {**value, "init_args": {k: fresh(v) for k, v in value.get("init_args", {}).items()}})
    if isinstance(value, (list, tuple)):
        return [fresh(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, dict, timedelta)):
        return value
    return copy.deepcopy(value)


def logs_dir(cfg) -> Path | None:
    """<default_root_dir>/logs, where each stage logs to a CSVLogger of its own while `--trainer.logger` is unset;
    None when it is set (false, or a logger of the user's)."""
    if cfg.trainer.logger not in (None, True):
        return None
    return Path(cfg.trainer.default_root_dir or ".") / "logs"


def log_interval(steps: int) -> int:
    """Steps between the logged rows of a `steps`-step training fit: about ten rows a run (every step of a short
    one), never further apart than Lightning's default of 50."""
    return max(1, min(50, steps // 10))


def trainer_kwargs(cfg, stage: str, callbacks: list | None = None, log_every: int | None = None,
                   **overrides) -> dict:
    """Every --trainer.* option for one stage's Trainer ("calibrate", "recover" or "evaluate_<row>"), with fresh
    instances, the stage's own callbacks after the user's and its own settings on top. `ModelParallelStrategy`
    thus runs every stage under FSDP2 (see fmoe.lightning.sharding). Unset, the logger is a CSVLogger writing
    <logs_dir>/<stage>/metrics.csv and `log_every_n_steps` is `log_every` (None: Lightning's default)."""
    options = {k: fresh(v) for k, v in cfg.trainer.as_dict().items()}
    if stage == "calibrate":
        for key in TRAINING_ONLY:
            options.pop(key)
    options["callbacks"] = [*(options.get("callbacks") or []), *(callbacks or [])]
    logs = logs_dir(cfg)
    if logs is not None:  # one directory per stage, no version_N: a new run clears logs/ first (start_run)
        options["logger"] = CSVLogger(logs, name="", version=stage)
    if options.get("log_every_n_steps") is None:
        options["log_every_n_steps"] = log_every
    return {**options, **overrides}


def cache_dense_logits(model, data, path: Path, top_k: int | None) -> None:
    """Rank 0 runs the still dense model once over the training set (on its GPU when it has one) and writes its
    logits to `path` (fmoe.recovery.distill.cache_teacher); the other ranks read the file when the recovery fit starts."""
    if process_rank() != 0:
        return
    home = next(model.parameters()).device
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else home
    try:
        cache_teacher(model.to(device), data.train_dataloader(), path, top_k)
    finally:
        model.to(home)


def sizes(model) -> dict:
    """Total parameters, parameters a token runs through, weight bytes."""
    return {"params": sum(p.numel() for p in model.parameters()), "active": int(fmoe.active_parameters(model)),
            "weight_MB": fmoe.weight_bytes(model) / 2**20}


def toy_lm_eval(options: LMEval, limit: int, run_dir: Path) -> LMEval:
    """lm-eval on the toy model: its tasks over the toy corpus (`fmoe_<domain>`, YAMLs written under `run_dir` by
    rank 0, the one that runs lm-eval) can be named; unset, its arithmetic task runs on `limit` records when lm-eval
    is installed."""
    if options.tasks is None:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            rank_zero_info(f"no lm-eval scores: lm-evaluation-harness is not installed ({evaluation.EVAL_EXTRA})")
            return LMEval(tasks=[])
        options = LMEval(tasks=["fmoe_arithmetic"], limit=options.limit or limit, include_path=options.include_path)
    if options.tasks and options.include_path is None and process_rank() == 0:
        options.include_path = str(toy.toy_tasks_dir(run_dir / "lm_eval_tasks"))
    return options


# what a run writes into its directory (besides lm_eval_tasks/, and logs/, which start_run clears when the recipe's
# own); a new run there removes them first
RUN_FILES = ("run.json", "config.yaml", "plan.json", "scores", "statistics", "teacher.safetensors", "report.png")


def check_export_dir(run_dir: Path, export_dir: Path) -> None:
    """The export replaces its directory: it may not be the run directory or hold it."""
    run, export = run_dir.resolve(), export_dir.resolve()
    if export == run or export in run.parents:
        raise ValueError(f"--export_dir {export_dir} would replace the run directory {run_dir} (or a folder above "
                         "it): give the export a directory of its own")


def is_export(path: Path) -> bool:
    """A model directory a run exported (fmoe.save_pretrained, with its results.json)."""
    return (path / "config.json").is_file() and (path / "results.json").is_file()


def start_run(run_dir: Path, export_dir: Path, argv, config: str, logs: Path | None) -> None:
    """Rank 0 clears the previous run's files from `run_dir`, the stage logs at `logs` (the recipe's own; None:
    the user's logger keeps its files) and the export it left at `export_dir`, writes the run's resolved `config`
    (YAML) to config.yaml and marks the run as running in run.json, so that a run stopped part way never leaves a
    plan beside an export it did not make. Called once every option is checked; anything else at `export_dir`
    stays until the export replaces it."""
    if process_rank() != 0:
        return
    stale = [*(run_dir / name for name in RUN_FILES), *([logs] if logs else []),
             *([export_dir] if is_export(export_dir) else [])]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config)
    write_json(run_dir / "run.json", {"status": "running", "argv": argv, "export": str(export_dir)})


def lm_eval_metrics(model, tokenizer, options: LMEval, is_global_zero: bool) -> dict[str, float]:
    """{'<task>_<metric>': value} of fmoe.evaluation.lm_eval (lm-eval's ",none" filter suffix dropped), run on
    rank 0 only (lm-eval runs in-process on one device; the other ranks wait at a barrier, so the process group's
    timeout must cover the run)."""
    metrics = {}
    if is_global_zero:
        with console.quiet_lm_eval():
            results = evaluation.lm_eval(model, tokenizer, options.tasks, limit=options.limit,
                                         include_path=options.include_path)
        metrics = {f"{task}_{name.removesuffix(',none')}": value
                   for task, values in results.items() for name, value in values.items()}
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics


def main(args=None, prog: str | None = None) -> dict:
    """Run the recipe on `args` (sys.argv when None); `prog`: the command name --help shows."""
    cli = RecipeCLI(calibration, TextDataModule, run=False, args=args, save_config_callback=None,
                    parser_kwargs={"prog": prog} if prog else None)
    with cli.console:
        return run(cli, args)


def run(cli: RecipeCLI, args) -> dict:
    """The stages of a run whose options `cli` parsed -> the table's rows."""
    cfg, trainer, module, data = cli.config, cli.trainer, cli.model, cli.datamodule
    stages, prune_cfg, recover_cfg = Stages(**cfg.stages), Prune(**cfg.prune), Recover(**cfg.recover)
    lm_eval_cfg = LMEval(**cfg.lm_eval)
    run_dir = Path(cfg.trainer.default_root_dir or ".")  # everything this run writes goes under it
    export_dir = Path(cfg.export_dir) if cfg.export_dir else run_dir / "export"
    # every option is checked before any stage runs
    if (prune_cfg.steps != 1 or prune_cfg.reconstruct) and prune_cfg.method != "dims":
        raise ValueError(f"--prune.steps and --prune.reconstruct apply to the dims method, not {prune_cfg.method!r}")
    options = {k: v for k, v in asdict(prune_cfg).items() if k not in ("method", "amount")}
    options = methods.options_of(prune_cfg.method, options)
    if prune_cfg.method == "dims":  # its own callback: iterative steps re-score inside the calibration fit
        compression = IntermediatePruning(prune_cfg.amount, save_dir=run_dir, steps=prune_cfg.steps,
                                          reconstruct=prune_cfg.reconstruct, lam=prune_cfg.lam, **options)
    else:  # checks the method's name, amount and options
        compression = Compression(prune_cfg.method, prune_cfg.amount, save_dir=run_dir, **options)
    if recover_cfg.teacher not in ("live", "cached"):
        raise ValueError(f"--recover.teacher is live or cached, not {recover_cfg.teacher!r}")
    if recover_cfg.distill:
        check_options(recover_cfg.temperature, recover_cfg.kd_weight)
    check_export_dir(run_dir, export_dir)
    check_strategy(module.criterion, trainer.strategy)
    if cfg.model.model == "toy":
        lm_eval_cfg = toy_lm_eval(lm_eval_cfg, cfg.task_limit, run_dir)
    if lm_eval_cfg.tasks and process_rank() == 0:  # rank 0 runs lm-eval
        evaluation.check_tasks(lm_eval_cfg.tasks, lm_eval_cfg.include_path)
    start_run(run_dir, export_dir, args if args is not None else sys.argv[1:],
              cli.parser.dump(cfg, skip_none=False), logs_dir(cfg))
    data.setup("fit")
    paths = cfg.tasks
    if paths is None:
        paths = {d: str(f["test"]) for d, f in toy.corpus_files().items()} if cfg.model.model == "toy" else {}
    tasks = {name: load_tasks(path, cfg.task_limit) for name, path in paths.items()}
    rows = {}
    measured = "; ".join(f"{what} {', '.join(names)}" for what, names in (
        ("perplexity of", data.eval_names), ("exact match on", tasks), ("lm-eval", lm_eval_cfg.tasks or [])) if names)

    def record(stage, model):
        row = sizes(model)
        if stages.evaluate:
            console.header("evaluate", f"the {stage} model: {measured or 'sizes only'}")
            scores = {}
            if lm_eval_cfg.tasks:
                scores = lm_eval_metrics(model, data.tokenizer, lm_eval_cfg, trainer.is_global_zero)
            measures = evaluate(model, data, trainer_kwargs(cfg, f"evaluate_{stage}"), tasks, data.tokenizer,
                                metrics={**row, **scores})  # the whole row in the stage's log
            console.result("evaluate", console.metrics({**measures, **scores}))
            row.update(measures)
            row.update(scores)
        rows[stage] = row

    record("dense", module.model)
    cached = recover_cfg.distill and recover_cfg.teacher == "cached"
    cache = run_dir / "teacher.safetensors"
    if stages.recover and cached:  # now, while the model is still dense
        console.header("distill", f"the dense model's logits (top {recover_cfg.top_k}) over the training set")
        cache_dense_logits(module.model, data, cache, recover_cfg.top_k)
        console.result("distill", f"cached in {cache}")
    plan = None
    pruning = f"{prune_cfg.method}, amount {prune_cfg.amount:g}"
    if stages.prune and not methods.method(prune_cfg.method).reads:  # nothing to calibrate (compressed experts)
        console.header("prune", pruning)
        plan = methods.compress(module.model, prune_cfg.method, prune_cfg.amount, **options)
        if trainer.is_global_zero:
            plan.save(run_dir / "plan.json")
        console.result("prune", f"plan in {run_dir / 'plan.json'}")
        record("pruned", module.model)
    elif stages.calibrate:
        callbacks = [compression] if stages.prune else []
        calibrated = f"{module.criterion} calibration over {len(data.train_set)} training sequences"
        console.header("calibrate", f"{calibrated}, then prune ({pruning})" if stages.prune else calibrated)
        # every step: each one already reads its counts and finiteness flags on the host
        calib = L.Trainer(**trainer_kwargs(cfg, "calibrate", callbacks, log_every=1))
        calib.fit(module, datamodule=data)
        if stages.prune:  # the result: the line its Compression callback logged
            plan = compression.plan
            record("pruned", module.model)
        else:
            console.result("calibrate", "scores only, no pruning")
    model = module.model
    if stages.recover:
        trained = f"LoRA adapters (r {recover_cfg.r})"
        if recover_cfg.tune_experts:
            trained = "the routed experts" + (f" and {trained}" if recover_cfg.r else "")
        objective = (f"by distillation from the {recover_cfg.teacher} dense model" if recover_cfg.distill
                     else "on the data loss")
        console.header("recover", f"{trained} {objective}, {recover_cfg.max_steps} steps")
        teacher = None
        if cached:  # the logits rank 0 cached before pruning
            teacher = str(cache)
        elif recover_cfg.distill:  # the dense model read again (by rank 0; the others get it when the fit starts)
            teacher = load_model(checkpoint_of(cfg.model.model), dtype=getattr(torch, cfg.model.dtype))
        recovery = LoRARecovery(model, r=recover_cfg.r, alpha=recover_cfg.alpha, lr=recover_cfg.lr,
                                experts=recover_cfg.experts, eval_names=tuple(data.eval_names), tasks=tasks,
                                tokenizer=data.tokenizer, tune_experts=recover_cfg.tune_experts, teacher=teacher,
                                temperature=recover_cfg.temperature, kd_weight=recover_cfg.kd_weight)
        fit = L.Trainer(**trainer_kwargs(cfg, "recover", log_every=log_interval(recover_cfg.max_steps),
                                         max_steps=recover_cfg.max_steps, max_epochs=-1,
                                         check_val_every_n_epoch=None,
                                         val_check_interval=recover_cfg.val_check_interval))
        fit.fit_loop.max_epochs = epochs_for(recover_cfg.max_steps, len(data.train_set), data.hparams.batch_size, fit)
        fit.fit(recovery, datamodule=data)
        del recovery.teacher  # a live teacher's memory goes back before the last evaluation
        model = recovery.merged()
        loss = fit.callback_metrics.get("train_loss")
        console.result("recover", f"{fit.global_step} steps" + ("" if loss is None else f", train_loss {loss:.3f}"))
        record("recovered", model)
    if stages.export and trainer.is_global_zero:
        console.header("export", f"the {list(rows)[-1]} model to {export_dir}")
        out = fmoe.save_pretrained(model, export_dir, tokenizer=data.tokenizer)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        console.result("export", f"weights, config, tokenizer and results.json; serve it: {serve_command(out)}")
    if trainer.is_global_zero:
        write_report(rows, plan, run_dir / "report.png")
        write_json(run_dir / "run.json", {"status": "complete", "argv": args if args is not None else sys.argv[1:],
                                          "export": str(export_dir) if stages.export else None,
                                          "plan": "plan.json" if plan is not None else None, "rows": rows})
        print_table(rows)
    if torch.distributed.is_initialized():  # closed here: left to interpreter exit, gloo's threads can abort it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rows


def print_table(rows: dict) -> None:
    first = ("params", "active", "weight_MB")
    columns = sorted({k for r in rows.values() for k in r},
                     key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    widths = [max(len(c) + 2, 11) for c in columns]
    print(f"\n{'stage':<10}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for stage, row in rows.items():
        cells = "".join(f"{row[c]:>{w}.3f}" if isinstance(row.get(c), float) else f"{row.get(c, '-'):>{w}}"
                        for c, w in zip(columns, widths))
        print(f"{stage:<10}{cells}")


if __name__ == "__main__":
    main()
