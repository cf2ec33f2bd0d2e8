"""The `fmoe` command: each subcommand is a recipe's CLI (fmoe/recipes), with the same arguments and configs.

    fmoe prune-recover                                            # the toy MoE, CPU, about a minute
    fmoe prune-recover --config recipes/configs/mixtral-8x7b.yaml # 8 GPUs, FSDP2
    fmoe train-toy --toy.steps 200 --out_dir /tmp/toy
    fmoe prune-checkpoint SRC --plan plan.json --out DST          # out of core: never loads the model
    fmoe prune-checkpoint SRC --calibration data.jsonl --method fisher --amount 0.5 --out DST  # streamed calibration
    fmoe serve runs/prune_recover/export                          # vLLM (fused exports: with plugins/vllm)
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings

COMMANDS = {  # name: (module, function taking the remaining arguments, what it does)
    "prune-recover": ("fmoe.recipes.prune_recover", "main", "calibrate -> prune -> recover -> evaluate -> export"),
    "train-toy": ("fmoe.recipes.train_toy_moe", "cli", "train the toy MoE on the generated corpus (CPU)"),
    "prune-checkpoint": ("fmoe.recipes.prune_checkpoint", "cli",
                         "calibrate, plan and prune a safetensors checkpoint without loading the model"),
    "serve": ("fmoe.serving.vllm", "serve", "serve an export with vLLM's OpenAI-compatible server"),
}


def usage() -> str:
    lines = [f"  {name:<18}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "usage: fmoe COMMAND [--help | ARGS]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"fmoe: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}\n\n{usage()}")
    module, function, _ = COMMANDS[argv[0]]
    # the arguments go in explicitly while sys.argv stays whole: DDP/FSDP2 relaunch `fmoe COMMAND ...` as is
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    run = getattr(importlib.import_module(module), function)
    if "prog" in inspect.signature(run).parameters:  # its --help then reads `usage: fmoe COMMAND`
        run(argv[1:], prog=f"fmoe {argv[0]}")
    else:
        run(argv[1:])


if __name__ == "__main__":
    main()
