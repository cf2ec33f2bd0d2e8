"""The toy domain-specialist MoE: a small OLMoE trained from scratch on fmoe.toy.corpus, shipped in fmoe/toy/assets.

It exists so the criteria can be compared on a model that has really learned distinct capabilities (arithmetic,
factual recall, in-context reading) with no download. `train` is the whole recipe (plain PyTorch, seeded, CPU);
`load` returns the shipped checkpoint and `corpus_files` the exact data it was trained and tested on.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..evaluation.harness import TASK_PREFIX, task_yaml
from ..evaluation.tasks import accuracy, load_tasks
from ..io import atomic_write_text
from ..model.checkpoint import from_pretrained, save_pretrained
from . import corpus
from .tiny import tiny_model

TOY_DIR = Path(__file__).parent / "assets" / "toy_moe"
TRAIN_CONFIG = "train_config.json"
PAD, EOS = "<|pad|>", "<|endoftext|>"


@dataclass
class ToyConfig:
    # model: transformers' OLMoE (8 routed experts, top-2, no shared expert: every capability lives in the experts)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128  # per routed expert: the dims fmoe prunes
    num_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 1024
    router_aux_loss_coef: float = 0.01
    # data: fmoe.toy.corpus.build arguments and the share of each domain in a batch
    n_train: int = 20000
    n_eval: int = 200
    n_people: int = 120
    data_seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {"arithmetic": 0.4, "facts": 0.35, "general": 0.25})
    # optimisation
    steps: int = 8000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 1000
    eval_limit: int = 100  # val records per domain in the periodic evaluation


def corpus_files(config: ToyConfig | None = None, root: str | Path | None = None) -> dict[str, dict[str, Path]]:
    """{domain: {split: jsonl path}} of the toy corpus, generated once into a cache directory (deterministic)."""
    config = config or ToyConfig()
    kwargs = dict(n_train=config.n_train, n_eval=config.n_eval, n_people=config.n_people, seed=config.data_seed)
    tag = "-".join(str(v) for v in kwargs.values())
    root = Path(root or os.environ.get("FMOE_CACHE", Path.home() / ".cache" / "fmoe")) / f"toy_corpus-{tag}"
    paths = {d: {s: root / d / f"{s}.jsonl" for s in corpus.SPLITS} for d in corpus.DOMAINS}
    if not all(p.is_file() for splits in paths.values() for p in splits.values()):
        corpus.write(root, **kwargs)
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def interleaved(files: dict[str, dict[str, Path]], split: str, limit: int | None = None) -> list[str]:
    """The texts of every domain's `split`, the domains in turn (the first `limit` of each)."""
    per_domain = [[r["text"] for r in read_jsonl(files[d][split])][:limit] for d in files]
    return [t for group in zip(*per_domain) for t in group]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the corpus with every digit its own token (so numbers are spelled digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def build_model(config: ToyConfig, tokenizer) -> nn.Module:

    return tiny_model(
        "olmoe", seed=config.seed, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads, intermediate_size=config.intermediate_size,
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok, vocab_size=len(tokenizer),
        router_aux_loss_coef=config.router_aux_loss_coef, tie_word_embeddings=True, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, EOS-terminated (how the toy model saw its documents)."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def batches(tokenizer, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of `texts` in order (calibration or fine-tuning data for fmoe.score / LoRA)."""
    docs = encode(tokenizer, texts)
    return [collate(docs[i: i + batch_size], tokenizer.pad_token_id) for i in range(0, len(docs), batch_size)]


def collate(docs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest; padding is masked out of attention and loss."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id)  # [B, T]
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def evaluate_accuracy(model, tokenizer, files: dict[str, dict[str, Path]], split: str = "val",
                      limit: int | None = None) -> dict[str, float]:
    """Exact-match accuracy per domain on one split."""
    return {d: accuracy(model, tokenizer, *load_tasks(files[d][split], limit)) for d in files}


def train(config: ToyConfig, out_dir: str | Path | None = None, log=print):
    """Train tokenizer and model on the toy corpus; save both (and this config, with final accuracies) to out_dir."""
    from transformers import get_cosine_schedule_with_warmup


    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    files = corpus_files(config)
    train_rows = {d: read_jsonl(files[d]["train"]) for d in corpus.DOMAINS}
    tokenizer = train_tokenizer([r["text"] for rows in train_rows.values() for r in rows], config.vocab_size)
    docs = {d: encode(tokenizer, [r["text"] for r in rows]) for d, rows in train_rows.items()}
    model = build_model(config, tokenizer).train()
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tokenizer)}, "
        f"train docs {', '.join(f'{d} {len(v)}' for d, v in docs.items())}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0}],
                            lr=config.lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, config.warmup, config.steps)
    domains, weights = zip(*config.mix.items())
    t0 = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = collate([rng.choice(docs[d]) for d in rng.choices(domains, weights, k=config.batch_size)],
                        tokenizer.pad_token_id)
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            log(f"step {step} loss {out.loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.perf_counter() - t0) / step:.2f}s/step")
        if step % config.eval_every == 0 or step == config.steps:
            acc = evaluate_accuracy(model, tokenizer, files, "val", config.eval_limit)
            log(f"step {step} val accuracy " + " ".join(f"{d} {a:.3f}" for d, a in acc.items()))
            model.train()
    model.eval()
    result = {"val": evaluate_accuracy(model, tokenizer, files, "val"),
              "test": evaluate_accuracy(model, tokenizer, files, "test"),
              "train_seconds": round(time.perf_counter() - t0)}
    log(f"final accuracy {result}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_pretrained(model, out_dir, tokenizer=tokenizer)
        atomic_write_text(out_dir / TRAIN_CONFIG, json.dumps({"config": asdict(config), **result}, indent=2))
    return model, tokenizer, result


def load(directory: str | Path = TOY_DIR, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, ToyConfig) of a trained toy model (the shipped one by default), in eval mode."""
    from transformers import AutoTokenizer


    directory = Path(directory)
    if not (directory / TRAIN_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no trained toy model ({TRAIN_CONFIG} missing); "
                                "make one with `fmoe train-toy --out_dir DIR`")
    info = json.loads((directory / TRAIN_CONFIG).read_text())
    model = from_pretrained(directory, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(directory), ToyConfig(**info["config"])


def toy_tasks_dir(directory: str | Path | None = None, files: dict[str, dict[str, Path]] | None = None,
                  eos: str = "<|endoftext|>") -> Path:
    """A directory of lm-eval task YAMLs, `fmoe_<domain>` per toy domain, reading the generated toy corpus files
    (fmoe.toy.corpus_files() unless `files` is given); pass it as `include_path`. A fresh temp dir by default."""
    if files is None:
        files = corpus_files()
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="fmoe-lm-eval-tasks-"))
    directory.mkdir(parents=True, exist_ok=True)

    for domain, splits in files.items():
        atomic_write_text(directory / f"{TASK_PREFIX}{domain}.yaml", task_yaml(TASK_PREFIX + domain, splits, eos))
    return directory
