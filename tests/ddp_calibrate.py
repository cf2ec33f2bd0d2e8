"""2-process DDP (gloo, CPU) calibration; run by tests/test_lightning.py: python tests/ddp_calibrate.py OUT_DIR"""

import sys
from pathlib import Path

import lightning.pytorch as L
from torch.utils.data import DataLoader

from fmoe.lightning import CalibrationModule, IntermediatePruning
from fmoe.tiny import tiny_model
from tests.test_lightning import sequences

if __name__ == "__main__":
    out = Path(sys.argv[1])
    module = CalibrationModule(tiny_model("qwen3_moe"))
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning], default_root_dir=out)
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    pruning.plan.save(out / f"plan_rank{trainer.global_rank}.json")  # every rank must reach the same plan
