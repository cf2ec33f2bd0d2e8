"""The one definition of next-token NLL that scoring, evaluation and LoRA recovery share.

A target token counts when its label is not -100 and both it and the position predicting it are real tokens
(attention_mask == 1): padding is never supervised, whatever the labels say, and left padding never predicts the
first token. Position ids are counted over real tokens, so padding on either side does not shift positions.
The NLL is computed a chunk of positions at a time from the model's logits, so no [B, T, vocab] float32 copy is
made (at a 152k vocabulary and 4 x 1024 tokens one copy is 2.5 GB); under autograd each chunk is recomputed in
the backward instead of being kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**25  # float32 logits materialised at once (128 MB)


@dataclass
class Batch:
    """A causal-LM batch made explicit: padding mask, labels (-100 = unsupervised) and position ids."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] (1 = token, 0 = padding; left or right)
    labels: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], counted over real tokens so padding does not shift positions


def prepare_batch(batch: Mapping[str, torch.Tensor], device: torch.device | None = None) -> Batch:
    """A dict batch (input_ids [B, T] or [T]; optional attention_mask, labels) as an explicit Batch on `device`."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"a batch needs 'input_ids'; got {keys}")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer [batch, seq] tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).reshape(input_ids.shape)
    labels = batch.get("labels")
    labels = input_ids if labels is None else torch.as_tensor(labels).reshape(input_ids.shape)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    device = input_ids.device if device is None else device
    return Batch(*(t.to(device) for t in (input_ids, mask.long(), labels.long(), position_ids)))


def targets(batch: Batch) -> torch.Tensor:
    """Next-token targets [B, T-1]: the shifted labels, -100 wherever a target or its predictor is padding."""
    real = (batch.attention_mask[:, :-1] == 1) & (batch.attention_mask[:, 1:] == 1)
    return batch.labels[:, 1:].masked_fill(~real, -100)


def chunk_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # logits [B, C, V] in the model dtype, target [B, C] -> NLL summed over the chunk per sequence [B] (float32)
    return F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none").sum(1)


def chunked(fn, logits: torch.Tensor, target: torch.Tensor, *aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums over position chunks of `fn(logits chunk [B, C, V], target chunk [B, C], *aligned chunks)`, a tuple of
    per-sequence [B] float32 tensors. `logits` may be longer than `target` (its extra positions are ignored);
    `aligned` tensors are [B, T-1, ...] like `target`. Under autograd each chunk is recomputed in the backward."""
    b, steps = target.shape
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * logits.shape[-1]))
    # split, not slices: one SplitBackward concatenates the chunks' gradients once (a slice's backward would
    # allocate a full-size zero gradient per chunk)
    pieces = zip(logits[:, :steps].split(chunk, dim=1), target.split(chunk, dim=1),
                 *(t.split(chunk, dim=1) for t in aligned))
    sums = None
    for piece in pieces:
        if torch.is_grad_enabled() and logits.requires_grad and steps > chunk:
            part = checkpoint(fn, *piece, use_reentrant=False)  # float32 chunk recomputed in the backward
        else:
            part = fn(*piece)
        sums = part if sums is None else tuple(s + p for s, p in zip(sums, part))
    return sums


def forward(model: nn.Module, batch: Batch):
    """The model's output for a prepared batch (explicit position ids, no KV cache): next-token logits [B, T, V],
    and the load-balancing `aux_loss` of a MoE whose config sets `output_router_logits`."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False)


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's next-token logits [B, T, V] for a prepared batch (explicit position ids, no KV cache)."""
    return forward(model, batch).logits


def with_router_loss(model: nn.Module, output, loss: torch.Tensor, parts: dict) -> torch.Tensor:
    """`loss` + router_aux_loss_coef x the load-balancing loss in `output`, the term HF's `.loss` adds when the
    config sets `output_router_logits` (recorded as parts["aux"]); `loss` itself when the model returned none."""
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return loss
    parts["aux"] = aux.detach()
    return loss + model.config.router_aux_loss_coef * aux.to(loss.device)


def logits_nll(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL per sequence [B] float32, supervised token count per sequence [B]) of `logits`
    [B, T, V] computed for `batch`."""
    target = targets(batch)  # [B, T-1]
    (nll,) = chunked(lambda z, t: (chunk_nll(z, t),), logits, target)
    return nll, (target != -100).sum(1)


def sequence_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL per sequence [B] float32, supervised token count per sequence [B]).

    nll[n] / count[n] is what the HF model returns as `.loss` for sequence n alone; nll.sum() / count.sum() is its
    `.loss` for the whole batch.
    """
    return logits_nll(forward_logits(model, batch), batch)


def mean_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over the batch's supervised tokens, their count): HF's `.loss`, 0 (still in the graph) when
    nothing is supervised, so that every data-parallel rank runs the same backward."""
    return _mean(*sequence_nll(model, batch))


def _mean(nll: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = counts.sum()
    return nll.sum() / total.clamp(min=1), total


def training_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(HF's `.loss` for the batch: `mean_nll`, plus router_aux_loss_coef x the load-balancing loss when the config
    sets `output_router_logits`; {"nll": mean NLL, "aux": that loss (when on), "tokens": supervised tokens})."""
    output = forward(model, batch)
    nll, total = _mean(*logits_nll(output.logits, batch))
    parts = {"nll": nll.detach(), "tokens": total}
    return with_router_loss(model, output, nll, parts), parts


@torch.no_grad()
def corpus_nll(model: nn.Module, batches) -> float:
    """Mean next-token NLL per supervised token over every batch of `batches` (held-out loss, no gradients)."""
    total = count = 0.0
    for batch in batches:
        nll, n = sequence_nll(model, prepare_batch(batch))
        total, count = total + float(nll.sum()), count + float(n.sum())
    return total / count
