"""Train the toy domain-specialist MoE (tokenizer + OLMoE from scratch) on the generated corpus, on CPU.

    fmoe train-toy                                    # the shipped model: fmoe/toy/assets/toy_moe (30 CPU minutes)
    fmoe train-toy --toy.steps 200 --out_dir /tmp/toy # a quick CPU-sized run
    fmoe train-toy --help                             # or: python recipes/train_toy_moe.py ...

Seeded and offline: the corpus is fmoe.toy.corpus (arithmetic, facts, general), the tokenizer a byte-level BPE trained
on it, the model transformers' OLMoE (8 routed experts, top-2). Prints loss and per-domain validation accuracy as
it trains; writes safetensors weights, tokenizer and train_config.json (the config and final val/test accuracy).
"""

from __future__ import annotations

import torch
from jsonargparse import auto_cli

from ..toy.model import TOY_DIR, ToyConfig, train


def main(toy: ToyConfig = ToyConfig(), out_dir: str = str(TOY_DIR), threads: int = 2) -> None:
    """Train with `toy` and save to `out_dir`."""
    torch.set_num_threads(threads)
    train(toy, out_dir, log=lambda msg: print(msg, flush=True))


def cli(args: list[str] | None = None) -> None:
    auto_cli(main, args=args)


if __name__ == "__main__":
    cli()
