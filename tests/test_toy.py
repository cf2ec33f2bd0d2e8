import json

import pytest
import torch

from fmoe import toy
from fmoe.toy import corpus
from fmoe.evaluation.tasks import accuracy, load_tasks


def test_corpus_is_seeded_with_disjoint_splits_and_checkable_answers():
    a, b = corpus.build(n_train=300, n_eval=40), corpus.build(n_train=300, n_eval=40)
    assert a == b and list(a) == list(corpus.DOMAINS)
    for domain, splits in a.items():
        prompts = {s: {r["prompt"] for r in rows if "prompt" in r} for s, rows in splits.items()}
        assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
        assert not prompts["val"] & prompts["test"]
        for row in splits["val"] + splits["test"]:
            assert row["text"].startswith(row["prompt"]) and row["text"].endswith(f"#### {row['answer']}")
    for row in a["arithmetic"]["test"]:  # the worked answer is the arithmetic truth
        steps = row["text"].split("A: ")[1].split(" . ")[:2]
        for step in steps:
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs.strip(" ."))  # noqa: S307 (generated "12 + 7" style expressions)
        assert steps[1].split(" = ")[1].strip(" .") == row["answer"]
    kb = corpus.knowledge_base()
    asked = {r["prompt"] for r in a["facts"]["val"] + a["facts"]["test"]}
    assert len(asked) == 3 * len(kb)  # every fact is asked once, in its held-out phrasing


def test_train_save_load_round_trip(tmp_path):
    config = toy.ToyConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=16, vocab_size=400, n_train=200,
                           n_eval=8, n_people=10, steps=3, batch_size=4, eval_every=2, eval_limit=2)
    model, tokenizer, result = toy.train(config, tmp_path / "toy", log=lambda _: None)
    assert set(result["test"]) == set(corpus.DOMAINS)
    loaded, tok, cfg = toy.load(tmp_path / "toy")
    assert cfg == config and tok.get_vocab() == tokenizer.get_vocab()
    ids = tokenizer(["Q: Ada has 12 pens"], return_tensors="pt")["input_ids"]
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    info = json.loads((tmp_path / "toy" / toy.TRAIN_CONFIG).read_text())
    assert info["test"] == result["test"]
    with pytest.raises(FileNotFoundError, match="no trained toy model"):
        toy.load(tmp_path)


def test_shipped_tokenizer_spells_numbers_digit_by_digit():
    _, tokenizer, _ = toy.load()
    text = "Q: Bo has 54 pens .\nA: 54 + 38 = 92 . #### 92"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t))
