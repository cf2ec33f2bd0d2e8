"""The recipe's embedded default: a generated corpus, a tokenizer trained on it and a tiny MoE, made offline.

Deterministic (seeded) and small: runs the whole calibrate -> prune -> recover pipeline on a laptop CPU in a few
minutes with no network. The tiny model gets a short seeded pretraining (~10 s on CPU) on domain + general text,
so pruning visibly costs perplexity and recovery visibly wins some back; it is a smoke-sized demo, not evidence
about the criteria (that needs a model trained to real accuracy).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILES = ("train.jsonl", "domain_eval.jsonl", "general_eval.jsonl", "pretrain.jsonl")
_NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
_THINGS = ["apples", "books", "coins", "pens", "cups", "keys"]
_VERBS = ["walks to", "looks at", "thinks about", "writes to", "talks with", "waits for"]
_PLACES = ["the park", "the market", "the river", "the school", "the hill", "the station"]


def arithmetic_text(rng: random.Random) -> str:
    """A multi-step word problem with its worked answer (the domain)."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 9)
    return (f"{name} has {a} {thing} and buys {b} more , then gives away {c} . "
            f"{a} + {b} = {a + b} . {a + b} - {c} = {a + b - c} . answer : {a + b - c}")


def general_text(rng: random.Random) -> str:
    """Plain narrative sentences (general text)."""
    return " ".join(f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_NAMES)} at {rng.choice(_PLACES)} ."
                    for _ in range(rng.randint(2, 4)))


def write_corpus(directory: Path, n_train: int = 2000, n_eval: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = {
        "train.jsonl": [arithmetic_text(rng) for _ in range(n_train)],
        "domain_eval.jsonl": [arithmetic_text(rng) for _ in range(n_eval)],
        "general_eval.jsonl": [general_text(rng) for _ in range(n_eval)],
        "pretrain.jsonl": [arithmetic_text(rng) if i % 2 else general_text(rng) for i in range(2 * n_train)],
    }
    for name, texts in docs.items():
        (directory / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def train_tokenizer(directory: Path, files: list[Path]):
    """A word-level tokenizer trained on the corpus with `tokenizers`, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = (json.loads(line)["text"] for f in files for line in f.read_text().splitlines())
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def pretrain(model, rows, steps: int = 400, batch_size: int = 16, lr: float = 3e-3, seed: int = 0):
    """A short causal-LM pretraining on [N, T] token rows (plain PyTorch; seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, rows.shape[0], (batch_size,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def ensure_embedded(root: str | Path) -> dict[str, str]:
    """Create (once) and return the paths of the embedded model, tokenizer and data files."""
    root = Path(root)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        import torch

        from .checkpoint import save_pretrained
        from .data import tokenize_to_sequences
        from .tiny import tiny_model

        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        write_corpus(data)
        tokenizer = train_tokenizer(root / "tokenizer", [data / f for f in FILES])
        model = tiny_model("qwen2_moe", vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                           moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
                           num_experts_per_tok=2, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None, dtype=torch.float32)
        texts = [json.loads(line)["text"] for line in (data / "pretrain.jsonl").read_text().splitlines()]
        pretrain(model, tokenize_to_sequences(texts, tokenizer, seq_len=64))
        save_pretrained(model, model_dir, tokenizer=tokenizer)
    return {"model": str(model_dir), "tokenizer": str(model_dir), "train": str(root / "data" / FILES[0]),
            "domain_eval": str(root / "data" / FILES[1]), "general_eval": str(root / "data" / FILES[2])}
