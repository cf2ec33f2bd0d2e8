"""Train the toy domain-specialist MoE on the generated corpus, on CPU (fmoe.recipes.train_toy_moe).

    python recipes/train_toy_moe.py                                   # the shipped model: fmoe/toy/assets/toy_moe
    python recipes/train_toy_moe.py --toy.steps 200 --out_dir /tmp/toy   # a quick CPU-sized run
    python recipes/train_toy_moe.py --help                            # the same as `fmoe train-toy ...`
"""

from fmoe.recipes.train_toy_moe import cli

if __name__ == "__main__":
    cli()
