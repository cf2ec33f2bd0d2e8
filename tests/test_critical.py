import pytest
import torch

import fmoe
from fmoe.evaluation.critical import count, keep_except, random_dims, top_dims
from fmoe.toy.tiny import tiny_model


@pytest.fixture
def scored(batches):
    model = tiny_model("qwen2_moe")
    return model, fmoe.score(model, batches, "fisher", progress=False)


def _flags(scores, dims):
    """Boolean [E, I] per module: True where a dim is in `dims`."""
    out = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in scores.tensors.items()}
    for name, per_expert in dims.items():
        for e, d in enumerate(per_expert):
            out[name][e, d] = True
    return out


def test_top_dims_are_the_k_highest_and_keep_except_is_their_complement(scored):
    _, scores = scored
    removed = top_dims(scores, 12)
    assert count(removed) == 12
    flags = _flags(scores, removed)
    chosen = torch.cat([scores.tensors[n][f] for n, f in flags.items()])
    rest = torch.cat([scores.tensors[n][~f] for n, f in flags.items()])
    assert chosen.min() >= rest.max()
    kept = _flags(scores, keep_except(scores, removed))
    assert all(torch.equal(kept[n], ~flags[n]) for n in flags)


def test_random_dims_seeded_and_counted(scored):
    _, scores = scored
    a, b, c = random_dims(scores, 20, seed=0), random_dims(scores, 20, seed=0), random_dims(scores, 20, seed=1)
    assert count(a) == 20 and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))
    assert any(not torch.equal(x, y) for n in a for x, y in zip(a[n], c[n]))
    with pytest.raises(ValueError, match="k must be in"):
        random_dims(scores, 10**6)
    with pytest.raises(ValueError, match="unknown normalize"):
        top_dims(scores, 3, normalize="max")


def test_removing_no_dims_is_identity_and_removing_top_dims_changes_outputs(scored, batches):
    model, scores = scored
    ids = batches[0]["input_ids"]
    dense = model(input_ids=ids).logits
    with fmoe.masked(model, keep_except(scores, top_dims(scores, 0))):
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)  # hooked path: same math
    with fmoe.masked(model, keep_except(scores, top_dims(scores, 12))):
        assert not torch.allclose(model(input_ids=ids).logits, dense)
