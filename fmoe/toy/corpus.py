"""A seeded multi-domain corpus with checkable answers, made offline (the toy model's training and test data).

Three domains, each a different capability:
  arithmetic  two-step word problems with worked steps and a numeric answer (GSM8K-like: computation)
  facts       questions about a fixed synthetic knowledge base of people (parametric recall: memorised facts)
  general     short stories followed by a question whose answer is in the story (in-context reading)

Every record is {"prompt", "answer", "text"}: `text` = prompt + completion, where the completion ends with
"#### <answer>" (see fmoe.evaluation.tasks). Splits are disjoint by prompt. Facts are memorised by definition, so every fact
appears in training (a short bio of each person and questions in two of three phrasings); validation and test ask
each fact in the phrasing held out for it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DOMAINS = ("arithmetic", "facts", "general")
SPLITS = ("train", "val", "test")

_NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
_THINGS = ["apples", "books", "coins", "pens", "cups", "keys", "shells", "stamps"]
_PLACES = ["the park", "the market", "the river", "the school", "the hill", "the station", "the farm", "the beach",
           "the bridge", "the library"]
_MOVES = ["walks to", "runs to", "drives to", "goes to", "rides to"]
_CITIES = ["Varo", "Quessel", "Mirth", "Olland", "Thune", "Brisk", "Calder", "Ypres", "Nolo", "Sarn"]
_JOBS = ["baker", "pilot", "doctor", "farmer", "painter", "tailor", "miner", "sailor", "singer", "judge"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "gray"]
_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pim", "zu", "an", "bre", "co", "fi", "gul", "ho"]

# attribute -> (value list, bio clause, three question phrasings)
_ATTRIBUTES = {
    "city": (_CITIES, "lives in {v}", ["where does {p} live ?", "which city is {p} from ?", "{p} lives in which city ?"]),
    "job": (_JOBS, "works as a {v}", ["what is the job of {p} ?", "what does {p} do for work ?", "{p} works as what ?"]),
    "color": (_COLORS, "likes the color {v}",
              ["what color does {p} like ?", "which color is the favorite of {p} ?", "{p} likes which color ?"]),
}


def record(question: str, work: str, answer: str) -> dict:
    prompt = f"Q: {question}\nA:"
    completion = f" {work} #### {answer}" if work else f" #### {answer}"
    return {"prompt": prompt, "answer": answer, "text": prompt + completion}


def arithmetic(rng: random.Random) -> dict:
    """A two-step word problem; the completion shows both steps."""
    n1, n2 = rng.sample(_NAMES, 2)
    thing, kind = rng.choice(_THINGS), rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        c = rng.randint(1, a + b - 1)
        q = f"{n1} has {a} {thing} , buys {b} more and gives {c} to {n2} . how many {thing} does {n1} have now ?"
        return record(q, f"{a} + {b} = {a + b} . {a + b} - {c} = {a + b - c} .", str(a + b - c))
    if kind == 1:
        a, d = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a * d - 1)
        q = f"{n1} gets {a} {thing} each day for {d} days and loses {c} . how many {thing} are left ?"
        return record(q, f"{a} * {d} = {a * d} . {a * d} - {c} = {a * d - c} .", str(a * d - c))
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    q = f"{n1} has {a} {thing} and {n2} has {b} more than {n1} . how many {thing} do they have together ?"
    return record(q, f"{a} + {b} = {a + b} . {a} + {a + b} = {2 * a + b} .", str(2 * a + b))


def general(rng: random.Random) -> dict:
    """A three-sentence story, then where one of its people went (answer copied from the context)."""
    people = rng.sample(_NAMES, 3)
    places = rng.sample(_PLACES, 3)
    story = " ".join(f"{p} {rng.choice(_MOVES)} {w} ." for p, w in zip(people, places))
    i = rng.randrange(3)
    return record(f"{story} where did {people[i]} go ?", "", places[i])


def knowledge_base(n_people: int = 120, seed: int = 1) -> dict[str, dict[str, str]]:
    """{person: {attribute: value}}: made-up names (two or three syllables) with random attributes."""
    rng = random.Random(seed)
    people: dict[str, dict[str, str]] = {}
    while len(people) < n_people:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in people and name not in _NAMES:
            people[name] = {a: rng.choice(values) for a, (values, _, _) in _ATTRIBUTES.items()}
    return people


def facts(kb: dict[str, dict[str, str]], seed: int = 2) -> dict[str, list[dict]]:
    """Bios and two phrasings of every question in train; the third phrasing of each fact in val (half the people)
    or test (the other half)."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, (person, attrs) in enumerate(kb.items()):
        clauses = [_ATTRIBUTES[a][1].format(v=v) for a, v in attrs.items()]
        for order in (clauses, clauses[::-1]):  # two bios in different orders
            splits["train"].append({"text": f"{person} " + " and ".join(order) + " ."})
        for attr, value in attrs.items():
            phrasings = [q.format(p=person) for q in _ATTRIBUTES[attr][2]]
            held_out = phrasings.pop(rng.randrange(3))
            splits["train"] += [record(q, "", value) for q in phrasings]
            splits["val" if i % 2 == 0 else "test"].append(record(held_out, "", value))
    return splits


def sampled(make, rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Draw records until every split has its size, no prompt in two splits (eval splits first)."""
    seen, splits = set(), {}
    for split in ("test", "val", "train"):
        rows = []
        while len(rows) < sizes[split]:
            row = make(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        splits[split] = rows
    return splits


def build(n_train: int = 20000, n_eval: int = 200, n_people: int = 120, seed: int = 0) -> dict[str, dict]:
    """{domain: {split: records}}, deterministic in `seed`."""
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    corpus = {
        "arithmetic": sampled(arithmetic, random.Random(seed), sizes),
        "general": sampled(general, random.Random(seed + 1), sizes),
        "facts": facts(knowledge_base(n_people, seed + 2), seed + 3),
    }
    return {d: corpus[d] for d in DOMAINS}


def write(directory: str | Path, **kwargs) -> dict[str, dict[str, Path]]:
    """Write `<domain>/<split>.jsonl` under `directory`; returns their paths."""
    directory = Path(directory)
    paths: dict[str, dict[str, Path]] = {}
    for domain, splits in build(**kwargs).items():
        (directory / domain).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            path = directory / domain / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths.setdefault(domain, {})[split] = path
    return paths
