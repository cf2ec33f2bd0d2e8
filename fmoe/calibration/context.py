"""What every accumulator of a calibration pass shares: the model frozen while measuring, and per batch which
sequence each flattened token belongs to and which tokens are real."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .loss import Batch


@contextmanager
def frozen(model: nn.Module):
    """Eval mode (no dropout or router jitter while measuring) and no weight gradients; both restored on exit."""
    was_training = model.training
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)


class Context:
    """Per-batch facts the hooks need: which sequence each flattened token belongs to, and which are real."""

    def set(self, batch: Batch) -> None:
        b, t = batch.input_ids.shape
        self.batch_size = b
        self.sample_of_token = torch.arange(b, device=batch.input_ids.device).repeat_interleave(t)  # [B*T]
        self.valid = batch.attention_mask.reshape(-1).bool()  # [B*T]

    def real_rows(self, routing) -> torch.Tensor:
        """[S] rows of a grouped call that are real tokens routed to a real expert."""
        valid = self.valid[routing.tokens]
        return valid if routing.real is None else valid & routing.real
