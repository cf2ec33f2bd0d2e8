"""Calibrate -> prune -> recover -> evaluate -> export a transformers MoE (fmoe.recipes.prune_recover).

    python recipes/prune_recover.py                                   # the shipped toy MoE: CPU, no network, minutes
    python recipes/prune_recover.py --prune.amount 0.25 --prune.scope expert --recover.max_steps 50
    python recipes/prune_recover.py --config recipes/configs/qwen1.5-moe-a2.7b.yaml   # 8x80 GB, real checkpoint
    python recipes/prune_recover.py --help                            # the same as `fmoe prune-recover ...`
"""

from fmoe.recipes.prune_recover import main

if __name__ == "__main__":
    main()
