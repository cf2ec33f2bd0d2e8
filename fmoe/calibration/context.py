"""What every accumulator of a calibration pass shares: the protocol a Scorer drives them by, the model frozen
while measuring, and per batch which sequence each flattened token belongs to and which tokens are real."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from ..model.hooks import experts_hooks
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


def settle(pending: dict[str, torch.Tensor], totals: dict[str, torch.Tensor], commit: bool, key=lambda name: name):
    """End a step: add its held-back sums to the totals (totals[key(name)]) if `commit`, and zero them."""
    for name, t in pending.items():
        if commit:
            totals[key(name)] += t
        t.zero_()


class Accumulator:
    """The protocol of a calibration pass's accumulators (the dim criteria, the expert and layer statistics, the
    Gram sums), by which one Scorer drives them all:

    - `attached(model, ctx)`: a context manager with its hooks on `model`, all removed on exit; accumulators of
      the experts' intermediate activation implement `hook(name, ctx)` per experts module in `names` instead;
    - `end_step(commit)`: after a step with a backward, keep (or drop) the step's sums; a dropped step's batch
      runs again (fp16 loss scaling) and must add nothing twice;
    - `finite`: with gradients, a device flag per module in `names` (this step's gradients finite), else None;
    - `state()`: every summed tensor (SUM across ranks, checkpoints); `to(device)` moves them.
    """

    needs_grad = False
    names: list[str]
    finite: torch.Tensor | None = None

    def hook(self, name: str, ctx: Context):
        raise NotImplementedError

    def attached(self, model: nn.Module, ctx: Context) -> AbstractContextManager:
        return experts_hooks(model, {name: self.hook(name, ctx) for name in self.names})

    def end_step(self, commit: bool) -> None:
        pass

    def bad_module(self) -> str | None:
        """The first module whose gradients this step were not finite (a host sync: for error messages)."""
        if self.finite is None:
            return None
        bad = (~self.finite).nonzero()
        return self.names[int(bad[0])] if bad.numel() else None

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to(self, device) -> None:
        raise NotImplementedError
