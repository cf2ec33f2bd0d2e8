"""Recovery after pruning: what trains (lora.py: peft adapters, compressed experts' vectors, or the routed
experts themselves) and the distillation loss from the dense model (distill.py). The training loop is a
LightningModule, fmoe.lightning.recovery.LoRARecovery."""
