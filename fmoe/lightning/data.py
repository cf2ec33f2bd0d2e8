"""Text data for calibration, recovery and evaluation: `datasets` + the model's tokenizer, packed to seq_len.

Sources are local files (json/jsonl/parquet/txt/csv, by extension) or, where a network exists, hub dataset names.
Each source becomes fixed-length sequences of `seq_len` tokens: documents joined with EOS and packed, or with
`pack=False` one document per row (EOS-terminated, truncated or right-padded; padding is masked out of attention and
loss), for short documents such as question/answer records and models trained on unpacked documents. The calibration set is `n_samples` sequences drawn with `seed`; Lightning's
DistributedSampler shards every loader across ranks.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _has_text(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether the file holds anything but whitespace (read until the first such byte)."""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def load_texts(source: str, split: str = "train", text_field: str = "text", subset: str | None = None,
               template: str | None = None) -> list[str]:
    """Texts of a local file (by extension) or a hub dataset name (`subset` = its config name).

    `template` builds the text from several fields, e.g. "Question: {question}\nAnswer: {answer}".
    """
    import datasets

    path = Path(source)
    if path.suffix in _BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file {source} does not exist")
        if not _has_text(path):  # datasets' builders fail on it with a bare StopIteration or a split error
            raise ValueError(f"data file {source} holds no record (it is empty or blank)")
        ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(source, subset, split=split)
    if template is not None:
        try:
            texts = [template.format(**row) for row in ds]
        except KeyError as missing:
            raise KeyError(f"{source} has no field {missing} used by the template; fields: {ds.column_names}") from None
    elif text_field not in ds.column_names:
        raise KeyError(f"{source} has no field {text_field!r}; fields: {ds.column_names}")
    else:
        texts = list(ds[text_field])
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"{source} holds no non-empty {text_field!r} text")
    return texts


def tokenize_to_sequences(texts: list[str], tokenizer, seq_len: int, pack: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([N, seq_len] token ids, [N] lengths or None): documents joined by EOS and packed (lengths None: every token
    is real), or one EOS-terminated document per row, truncated or right-padded with the pad token (pack=False)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if pack:
        flat = [t for doc in ids for t in doc + eos]
        n = len(flat) // seq_len
        if n == 0:
            raise ValueError(f"data too short: not one sequence of {seq_len} tokens when packed; lower seq_len")
        return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len), None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("pack=False pads short documents, but the tokenizer has neither a pad nor an EOS token")
    rows = [(doc + eos)[:seq_len] for doc in ids]
    lengths = torch.tensor([len(r) for r in rows])
    return torch.tensor([r + [pad] * (seq_len - len(r)) for r in rows], dtype=torch.long), lengths


class _Sequences(torch.utils.data.Dataset):
    """Rows of token ids; with `lengths`, padding is masked out of attention (`attention_mask`) and loss (-100)."""

    def __init__(self, rows: torch.Tensor, lengths: torch.Tensor | None = None):
        self.rows, self.lengths = rows, lengths

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, i):
        if self.lengths is None:
            return {"input_ids": self.rows[i]}
        mask = (torch.arange(self.rows.shape[1]) < self.lengths[i]).long()
        return {"input_ids": self.rows[i], "attention_mask": mask, "labels": self.rows[i].masked_fill(mask == 0, -100)}


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch: its state is how many batches of the current pass it has handed
    out, and the first pass after `load_state_dict` skips them. For map-style datasets in a fixed order (no
    shuffling): Lightning fetches no batch ahead from a loader with a length, so handed out == trained on.

    Not torchdata's StatefulDataLoader (0.11, torch 2.13, Lightning 2.6), which Lightning also resumes: interrupted
    Fisher calibrations resumed to scores bit-identical to an uninterrupted run mid-epoch (shuffled too, single
    process), but (1) a checkpoint on the last batch of an epoch (every_n_train_steps dividing the epoch) resumed
    into an empty epoch: 10 of 20 samples scored; (2) under DDP, Lightning shuffles its DistributedSampler (it does
    not recognise torchdata's own SequentialSampler as unshuffled) and the restored loader fast-forwards the epoch-0
    permutation, not the current epoch's: rank 0 saw [4, 7 | 2, 1] in epoch 1, [5, 2 |] in epoch 2, and resumed
    there with [2, 1], so the scores differed (same sample count, other samples).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = self._taken = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._taken = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._taken += 1
                yield batch

    def state_dict(self) -> dict:
        return {"batches": self._taken}

    def load_state_dict(self, state: dict) -> None:
        taken = int(state["batches"])
        self._skip = taken if taken < len(self) else 0  # a finished pass resumes with the next one, whole


class TextDataModule(L.LightningDataModule):
    """Calibration/training on `train`, validation on `domain_eval` and `general_eval` (perplexity of each).

    `subset`/`template` describe the domain dataset (train and domain eval); `general_subset` the general one.

    Args:
        tokenizer: the tokenizer's hub name or directory (the model's).
        train: the calibration and training data: a local json/jsonl/parquet/txt/csv file or a hub dataset name.
        domain_eval: the domain's evaluation data (perplexity "domain"); None: none.
        general_eval: general text for evaluation (perplexity "general"); None: none.
        text_field: the field that holds each record's text.
        template: builds each text from several fields instead, e.g. "Q: {question} A: {answer}".
        subset: the config name of a hub dataset for train and domain_eval.
        split: the hub split of train.
        eval_split: the hub split of domain_eval and general_eval.
        general_subset: the config name of a hub dataset for general_eval.
        seq_len: tokens per sequence.
        n_samples: sequences in the calibration and training set, drawn with `seed`.
        batch_size: sequences per batch.
        eval_batch_size: sequences per evaluation batch (default: batch_size).
        max_eval_samples: sequences per evaluation set, at most.
        pack: join documents with EOS into full sequences; false: one document per row, padded.
        seed: the seed that draws the sequences.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, tokenizer: str, train: str, domain_eval: str | None = None, general_eval: str | None = None,
                 text_field: str = "text", template: str | None = None, subset: str | None = None,
                 split: str = "train", eval_split: str = "test", general_subset: str | None = None,
                 seq_len: int = 256, n_samples: int = 128, batch_size: int = 4,
                 eval_batch_size: int | None = None, max_eval_samples: int = 256, pack: bool = True, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    def _sequences(self, source, split, limit, seed, subset=None, template=None, asked: str | None = None
                   ) -> _Sequences:
        h = self.hparams
        texts = load_texts(source, split, h.text_field, subset, template)
        rows, lengths = tokenize_to_sequences(texts, self.tokenizer, h.seq_len, h.pack)
        if asked is not None and rows.shape[0] < limit:
            rank_zero_warn(f"{asked}={limit} sequences asked, but {source} gives {rows.shape[0]} (of {h.seq_len} "
                           f"tokens{', packed' if h.pack else ', one record each'}): using all {rows.shape[0]}")
        if limit is not None and rows.shape[0] > limit:
            pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
            rows, lengths = rows[pick], (lengths[pick] if lengths is not None else None)
        return _Sequences(rows, lengths)

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "_ready", False):
            return
        h = self.hparams
        if h.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {h.n_samples}")
        # train and domain eval share the domain's dataset layout (subset, template); general eval is plain text
        self.train_set = self._sequences(h.train, h.split, h.n_samples, h.seed, h.subset, h.template, "n_samples")
        self.eval_sets = {}
        if h.domain_eval:
            self.eval_sets["domain"] = self._sequences(h.domain_eval, h.eval_split, h.max_eval_samples, h.seed + 1,
                                                       h.subset, h.template)
        if h.general_eval:
            self.eval_sets["general"] = self._sequences(h.general_eval, h.eval_split, h.max_eval_samples, h.seed + 1,
                                                        h.general_subset)
        self._ready = True

    def _even(self, dataset: Dataset, name: str) -> Dataset:
        """The dataset cut to a multiple of the world size: Lightning's DistributedSampler would otherwise repeat
        samples to even out the ranks, and scores and perplexities would count them twice."""
        sampler = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        world = (sampler or {}).get("num_replicas", 1)  # data-parallel ranks (tensor-parallel ones share data)
        usable = len(dataset) - len(dataset) % world
        if usable == len(dataset):
            return dataset
        if usable == 0:
            raise ValueError(f"the {name} set has {len(dataset)} sequences, fewer than the {world} processes")
        rank_zero_warn(f"the {name} set's {len(dataset)} sequences do not split evenly over {world} processes: "
                       f"using the first {usable}, so that no sequence is counted twice")
        return Subset(dataset, range(usable))

    def train_dataloader(self):
        return ResumableDataLoader(self._even(self.train_set, "train"), batch_size=self.hparams.batch_size,
                                   shuffle=False, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        size = self.hparams.eval_batch_size or self.hparams.batch_size
        return [DataLoader(self._even(sequences, name), batch_size=size, num_workers=self.hparams.num_workers)
                for name, sequences in self.eval_sets.items()]

    @property
    def eval_names(self) -> list[str]:
        return [name for name, source in (("domain", self.hparams.domain_eval), ("general", self.hparams.general_eval))
                if source]
