"""Distillation from the dense model: the pruned student learns the teacher's next-token distributions.

    loss = weight * T^2 * KL(p_teacher^T || p_student^T) + (1 - weight) * NLL(data)

p^T = softmax(logits / T), both taken over the positions the data loss supervises (fmoe.calibration.loss.targets: padding
never counts), the KL averaged over those tokens as the NLL is (Hinton et al. 2015; T^2 keeps the gradient scale
of the soft term independent of T). The teacher is either a live model (run under no_grad beside the student:
under DDP a replica per rank, under FSDP2 sharded like the student, see fmoe.lightning.recovery) or a
`TeacherCache`: its logits computed once over the training sequences and written to one safetensors file, all of the
vocabulary or each position's `top_k` largest, for small runs. With a top-k teacher both distributions are
renormalised over the teacher's k tokens, so the KL matches the student's relative probabilities there and leaves
the tail to the data loss (with k = vocabulary size it is the exact KL; a student equal to its teacher scores 0).
Cached sequences are found by their real tokens, so any loader, shuffling, padding side or rank split reads the
right rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.loss import (Batch, chunk_nll, chunked, forward, forward_logits, prepare_batch, targets,
                                with_router_loss)
from ..io import atomic_file

Teacher = tuple[torch.Tensor, torch.Tensor | None]  # (logits [B, T, k], their vocabulary ids [B, T, k] or None: all)
_FORMAT = "fmoe-teacher-cache"


def _chunk_terms(student: torch.Tensor, target: torch.Tensor, values: torch.Tensor, *ids: torch.Tensor,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # student [B, C, V], target [B, C], values [B, C, k] (ids [B, C, k]) -> (KL sum [B], NLL sum [B]) float32
    tempered = student.float() / temperature  # [B, C, V]
    if ids:
        tempered = tempered.gather(-1, ids[0].long())  # [B, C, k]: the teacher's support
    log_student = F.log_softmax(tempered, dim=-1)
    log_teacher = F.log_softmax(values.float() / temperature, dim=-1)  # [B, C, k]
    p_teacher = log_teacher.exp()
    # 0 where the teacher gives a token no probability (a -inf logit): no 0 * inf
    kl = torch.where(p_teacher > 0, p_teacher * (log_teacher - log_student), 0.0).sum(-1)  # [B, C]
    kl = kl.masked_fill(target == -100, 0.0).sum(1)
    return kl, chunk_nll(student, target)


def distillation_loss(model: nn.Module, batch: Batch, teacher: nn.Module | TeacherCache, temperature: float = 1.0,
                      weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weight * T^2 * mean KL + (1 - weight) * mean NLL over the batch's supervised tokens, {"kd": T^2 * mean KL,
    "nll": mean NLL, "tokens": their count}), plus the load-balancing term ("aux") when the student's config sets
    `output_router_logits` (fmoe.calibration.loss.with_router_loss). Like fmoe.calibration.loss.mean_nll the KL and NLL are 0, still in the
    graph, when nothing is supervised, and the [B, T, V] float32 terms are formed a chunk of positions at a time."""
    check_options(temperature, weight)
    values, ids = teacher_logits(teacher, batch)  # [B, T, k]
    output = forward(model, batch)
    logits = output.logits  # [B, T, V]
    vocab = teacher.vocab if isinstance(teacher, TeacherCache) else values.shape[-1]
    if values.shape[:2] != logits.shape[:2] or vocab != logits.shape[-1]:
        raise ValueError(f"teacher logits {tuple(values.shape)} do not match the student's {tuple(logits.shape)}: "
                         "the teacher must share the student's tokenizer and vocabulary")
    target = targets(batch)  # [B, T-1]
    steps = target.shape[1]
    aligned = (values[:, :steps],) + (() if ids is None else (ids[:, :steps],))

    def terms(z, t, *teacher_chunk):
        return _chunk_terms(z, t, *teacher_chunk, temperature=temperature)

    kl, nll = chunked(terms, logits, target, *aligned)
    tokens = (target != -100).sum()
    kd = temperature**2 * kl.sum() / tokens.clamp(min=1)
    nll = nll.sum() / tokens.clamp(min=1)
    parts = {"kd": kd.detach(), "nll": nll.detach(), "tokens": tokens}
    return with_router_loss(model, output, weight * kd + (1.0 - weight) * nll, parts), parts


def check_options(temperature: float, weight: float) -> None:
    """A clear error for a temperature or a KD weight out of range (before any work is done)."""
    if not temperature > 0 or not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation needs temperature > 0 and 0 <= kd_weight <= 1, got {temperature} and {weight}")


def teacher_logits(teacher: nn.Module | TeacherCache, batch: Batch) -> Teacher:
    """The teacher's next-token logits for `batch`: a live model's forward under no_grad, or a cache's rows."""
    if isinstance(teacher, TeacherCache):
        return teacher.lookup(batch)
    with torch.no_grad():
        return forward_logits(teacher, batch), None


def sequence_key(tokens: torch.Tensor) -> str:
    """The cache key of one sequence: a digest of its real tokens' ids."""
    return hashlib.sha1(tokens.to("cpu", torch.int64).numpy().tobytes()).hexdigest()


@torch.no_grad()
def cache_teacher(teacher: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], path: str | Path,
                  top_k: int | None = None, device: torch.device | str | None = None) -> TeacherCache:
    """Run `teacher` once over `batches` (dicts of input_ids [B, T] and optional attention_mask) and write the
    logits of every real position to `path` (safetensors, atomically): all V of them in the teacher's dtype, or
    the `top_k` largest (float32) with their ids (int32). Sequences seen twice are stored once."""
    from safetensors.torch import save_file

    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of logits per position, got {top_k}")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    rows, index, vocab, offset = {"values": [], "ids": []}, {}, None, 0
    try:
        for raw in batches:
            batch = prepare_batch(raw, device)
            logits = forward_logits(teacher, batch)  # [B, T, V]
            vocab = logits.shape[-1]
            for b in range(logits.shape[0]):
                real = batch.attention_mask[b] == 1
                key = sequence_key(batch.input_ids[b, real])
                if key in index:
                    continue
                z = logits[b, real]  # [n, V]
                if top_k is not None:
                    z, ids = z.float().topk(min(top_k, vocab), dim=-1)  # [n, k]
                    rows["ids"].append(ids.to("cpu", torch.int32))
                index[key] = [offset, int(z.shape[0])]
                offset += int(z.shape[0])
                rows["values"].append(z.cpu())
    finally:
        teacher.train(was_training)
    if not index:
        raise ValueError("no sequence to cache: the batches are empty")
    # one copy at a time: each list of rows is freed as soon as it is concatenated
    tensors = {name: torch.cat(rows.pop(name)) for name in ("values", "ids") if rows[name]}
    meta = {"format": _FORMAT, "vocab": str(vocab), "index": json.dumps(index)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return TeacherCache(path)


class TeacherCache:
    """The teacher logits `cache_teacher` wrote, read back per batch by each sequence's real tokens. The file is
    memory-mapped and read a sequence at a time, so a rank holds no more than its batch's rows."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"teacher cache {self.path} does not exist (fmoe.recovery.distill.cache_teacher writes it; "
                                    "every rank must see this path, e.g. on a shared filesystem)")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{self.path} is not a teacher cache (format={meta.get('format')!r})")
        self.vocab, self.index = int(meta["vocab"]), json.loads(meta["index"])
        self.keeps_top_k = "ids" in names  # each position keeps its k largest logits (else all of them)
        self._file = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # copies and pickles reopen the file
        return {**self.__dict__, "_file": None}

    def rows(self, name: str, start: int, length: int) -> torch.Tensor:
        """Rows start..start+length of the cached tensor `name` ("values" [N, k] or "ids" [N, k])."""
        from safetensors import safe_open

        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        return self._file.get_slice(name)[start: start + length]

    def lookup(self, batch: Batch) -> Teacher:
        """(values [B, T, k], ids [B, T, k] or None) for `batch`, zeros at padding (which no loss reads)."""
        b, t = batch.input_ids.shape
        device = batch.input_ids.device
        values, ids = None, None
        for n in range(b):
            real = batch.attention_mask[n] == 1
            key = sequence_key(batch.input_ids[n, real])
            if key not in self.index:
                raise KeyError(f"a training sequence is not in the teacher cache {self.path}: cache the teacher over "
                               "the same training data, tokenizer and sequence length as the recovery run")
            start, length = self.index[key]
            row = self.rows("values", start, length)  # [n_real, k]
            if values is None:
                values = torch.zeros(b, t, row.shape[-1], dtype=row.dtype, device=device)
                ids = torch.zeros(b, t, row.shape[-1], dtype=torch.int32, device=device) if self.keeps_top_k else None
            values[n, real] = row.to(device)
            if ids is not None:
                ids[n, real] = self.rows("ids", start, length).to(device)
        return values, ids
