"""The state a streamed sweep keeps between layers: the hidden states at the layer boundaries (in memory or in
files) and, for a resumable sweep, the sums and the position reached, saved after each finished layer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .loss import Batch
from .scorer import Scorer

_PROGRESS, _STATE = "progress.json", "state.safetensors"


class Boundaries:
    """Hidden states [B, T, H] per (boundary, batch): in memory, or in one file per boundary under `directory`
    (batches at fixed offsets, plain writes and reads: only the batch being used is in memory)."""

    def __init__(self, shapes: list[torch.Size], dtype: torch.dtype, directory: Path | None = None):
        self.shapes, self.dtype, self.directory = shapes, dtype, directory
        sizes = [s.numel() * dtype.itemsize for s in shapes]
        self.offsets = [sum(sizes[:b]) for b in range(len(sizes) + 1)]
        self.held: dict[str, list[torch.Tensor | None]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of one boundary (every batch of the chunk)."""
        return self.offsets[-1]

    def _path(self, slot: str) -> Path:
        return self.directory / f"{slot}.bin"

    def put(self, slot: str, b: int, t: torch.Tensor) -> None:
        if t.dtype != self.dtype or t.shape != self.shapes[b]:
            raise TypeError(f"a layer boundary of {list(self.shapes[b])} {self.dtype} was expected, got "
                            f"{list(t.shape)} {t.dtype}: this model's layers do not hand on states of the model dtype")
        t = t.detach().to("cpu").contiguous()
        if self.directory is None:
            self.held.setdefault(slot, [None] * len(self.shapes))[b] = t
            return
        path = self._path(slot)
        with open(path, "r+b" if path.exists() else "w+b") as f:
            f.seek(self.offsets[b])
            f.write(t.reshape(-1).view(torch.uint8).numpy())

    def get(self, slot: str, b: int, device) -> torch.Tensor:
        if self.directory is None:
            return self.held[slot][b].to(device)
        t = torch.empty(self.shapes[b], dtype=self.dtype)
        view, got, size = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0, self.offsets[b + 1] - self.offsets[b]
        with open(self._path(slot), "rb", buffering=0) as f:
            f.seek(self.offsets[b])
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise RuntimeError(f"{self._path(slot)} ended early: the sweep's files were changed or truncated")
                got += n
        return t.to(device)

    def drop(self, slot: str) -> None:
        self.held.pop(slot, None)
        if self.directory is not None:
            self._path(slot).unlink(missing_ok=True)


def run_key(facts: list, batches: list[Batch]) -> str:
    """What a resumed sweep must share with the interrupted one: `facts` (checkpoint fingerprint, criterion,
    chunking, rank; JSON) and the data."""
    digest = hashlib.sha256()
    digest.update(json.dumps(facts).encode())
    for batch in batches:
        for t in (batch.input_ids, batch.attention_mask, batch.labels):
            digest.update(t.cpu().numpy().tobytes())
    return digest.hexdigest()


def save_position(directory: Path, key: str, scorer: Scorer, position: dict) -> None:
    """The sums and the position reached, replaced atomically (a crash leaves the previous layer's)."""
    state = {k: t.detach().cpu().contiguous() for k, t in scorer.state().items()}
    save_file(state, str(directory / (_STATE + ".tmp")))
    os.replace(directory / (_STATE + ".tmp"), directory / _STATE)
    info = {"key": key, **position, "samples": scorer.samples, "tokens": scorer.tokens}
    (directory / (_PROGRESS + ".tmp")).write_text(json.dumps(info))
    os.replace(directory / (_PROGRESS + ".tmp"), directory / _PROGRESS)


def resume(directory: Path, key: str, scorer: Scorer) -> dict | None:
    """The position an interrupted sweep of this same run reached (its sums loaded into `scorer`), or None."""
    path = directory / _PROGRESS
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("key") != key:
        raise ValueError(f"{directory} holds the sweep of another run (checkpoint, criterion, batches or chunk "
                         "differ): remove it or choose another offload_dir")
    state = load_file(str(directory / _STATE))
    scorer.load_state({k: t.to(scorer.device) for k, t in state.items()}, info["samples"], info["tokens"])
    if info["phase"] == "done":
        return {"chunk": info["chunk"] + 1, "phase": "forward", "layer": 0}
    return {k: info[k] for k in ("chunk", "phase", "layer")}


def forget(directory: Path) -> None:
    """Remove a finished sweep's saved position and sums."""
    for name in (_PROGRESS, _STATE):
        (directory / name).unlink(missing_ok=True)
