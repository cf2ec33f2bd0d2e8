"""Recovery after pruning: knowledge distillation from the dense model (distill.py). LoRA training itself is a
LightningModule, fmoe.lightning.recovery.LoRARecovery."""
