import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fmoe
from fmoe.calibration import loss as loss_module
from fmoe.recovery.distill import TeacherCache, cache_teacher, distillation_loss
from fmoe.lightning.recovery import LoRARecovery
from fmoe.calibration.loss import prepare_batch, targets
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_lightning import sequences, trainer


def perturbed(model, scale=0.05, seed=1):
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return student


def reference(student, teacher, batch, temperature, weight):
    """The loss written out over the flat supervised positions with torch's own kl_div and cross_entropy."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    zs, zt = (m(**inputs).logits[:, :-1] for m in (student, teacher))
    target = targets(batch)
    real = target != -100
    kd = F.kl_div(F.log_softmax(zs[real] / temperature, -1), F.log_softmax(zt[real] / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    nll = F.cross_entropy(zs[real], target[real])
    return weight * kd + (1 - weight) * nll, kd, nll


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_loss_is_the_tempered_kl_mixed_with_the_data_loss(family):
    teacher = tiny_model(family)
    student = perturbed(teacher)
    batch = prepare_batch(make_batches(n_batches=1, batch_size=3, seq_len=10, seed=0, pad="mixed")[0])
    loss, parts = distillation_loss(student, batch, teacher, temperature=2.0, weight=0.3)
    expected, kd, nll = reference(student, teacher, batch, 2.0, 0.3)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["kd"], kd)
    torch.testing.assert_close(parts["nll"], nll)
    assert parts["tokens"] == (targets(batch) != -100).sum()


def test_a_student_equal_to_its_teacher_has_no_kd_loss_or_gradient():
    teacher = tiny_model("qwen3_moe")
    student = copy.deepcopy(teacher)
    batch = prepare_batch(make_batches(n_batches=1, batch_size=2, seq_len=10, seed=0, pad="right")[0])
    loss, _ = distillation_loss(student, batch, teacher, temperature=1.5, weight=1.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5


def test_padding_and_batching_do_not_change_the_summed_loss():
    teacher = tiny_model("qwen3_moe")
    student = perturbed(teacher)
    raw = make_batches(n_batches=1, batch_size=4, seq_len=12, seed=2, pad="mixed")[0]
    whole = prepare_batch(raw)
    _, parts = distillation_loss(student, whole, teacher, 2.0, 0.5)
    total = parts["kd"] * parts["tokens"]
    pieces = 0.0
    for n in range(4):  # each sequence alone, its padding stripped
        real = raw["attention_mask"][n] == 1
        _, one = distillation_loss(student, prepare_batch({"input_ids": raw["input_ids"][n, real]}), teacher, 2.0, 0.5)
        pieces = pieces + one["kd"] * one["tokens"]
    torch.testing.assert_close(total, pieces, rtol=1e-5, atol=1e-6)


def test_chunked_positions_give_the_same_loss_and_gradients(monkeypatch):
    teacher = tiny_model("qwen3_moe")
    batch = prepare_batch(make_batches(n_batches=1, batch_size=2, seq_len=12, seed=3, pad="mixed")[0])
    grads = []
    for elements in (2**25, 3 * teacher.config.vocab_size):  # one chunk / chunks of a few positions, recomputed
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", elements)
        student = perturbed(teacher)
        loss, _ = distillation_loss(student, batch, teacher, 2.0, 0.5)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_full_vocabulary_cache_equals_the_live_teacher_whatever_the_batch_order_and_padding(tmp_path):
    teacher = tiny_model("qwen3_moe")
    student = perturbed(teacher)
    raw = make_batches(n_batches=2, batch_size=3, seq_len=10, seed=0, pad="right")
    cache = cache_teacher(teacher, raw, tmp_path / "teacher.safetensors")
    assert len(cache) == 6 and not list(tmp_path.glob(".*tmp"))
    top_all = cache_teacher(teacher, raw, tmp_path / "top.safetensors", top_k=teacher.config.vocab_size)
    # the training batch: the cached sequences shuffled across batches and padded on the left instead
    rows = [(raw[i]["input_ids"][n][raw[i]["attention_mask"][n] == 1]) for i, n in ((1, 2), (0, 0), (1, 0))]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0)) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    batch = prepare_batch({"input_ids": ids, "attention_mask": mask})
    live, _ = distillation_loss(student, batch, teacher, 2.0, 0.5)
    for cached in (cache, top_all, TeacherCache(tmp_path / "teacher.safetensors")):
        torch.testing.assert_close(distillation_loss(student, batch, cached, 2.0, 0.5)[0], live, rtol=1e-5, atol=1e-6)


def test_a_top_k_cache_keeps_the_teachers_k_best_tokens(tmp_path):
    teacher = tiny_model("qwen3_moe")
    raw = make_batches(n_batches=1, batch_size=2, seq_len=8, seed=0, pad="none")
    cache = cache_teacher(teacher, raw, tmp_path / "top4.safetensors", top_k=4)
    batch = prepare_batch(raw[0])
    values, ids = cache.lookup(batch)
    logits = teacher(input_ids=batch.input_ids).logits
    expected, expected_ids = logits.topk(4, dim=-1)
    torch.testing.assert_close(values, expected)
    assert torch.equal(ids.long(), expected_ids)
    # a student that is the teacher scores KL 0 over the teacher's support too
    assert float(distillation_loss(copy.deepcopy(teacher), batch, cache, 1.0, 1.0)[0].detach()) < 1e-6


def test_bad_teachers_and_options_are_refused_clearly(tmp_path):
    teacher = tiny_model("qwen3_moe")
    raw = make_batches(n_batches=1, batch_size=2, seq_len=8, seed=0)
    cache = cache_teacher(teacher, raw, tmp_path / "t.safetensors")
    unseen = prepare_batch(make_batches(n_batches=1, batch_size=2, seq_len=8, seed=9)[0])
    with pytest.raises(KeyError, match="not in the teacher cache"):
        distillation_loss(teacher, unseen, cache)
    with pytest.raises(ValueError, match="temperature > 0"):
        distillation_loss(teacher, unseen, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(teacher, unseen, tiny_model("qwen3_moe", vocab_size=200))
    (tmp_path / "other.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes().replace(
        b"fmoe-teacher-cache", b"fmoe-teacher-cachX"))
    with pytest.raises(ValueError, match="not a teacher cache"):
        TeacherCache(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="cache_teacher writes it"):
        TeacherCache(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="tune_experts"):
        LoRARecovery(tiny_model("qwen3_moe"), r=0)


def pruned_pair(family="qwen3_moe"):
    """(the dense tiny model, a 50%-pruned ragged copy of it)."""
    dense = tiny_model(family)
    batches = [torch.utils.data.default_collate(sequences()[i:i + 4]) for i in (0, 4)]
    plan = fmoe.make_plan(fmoe.score(dense, batches), 0.5, scope="layer", multiple_of=4)
    return dense, fmoe.prune(copy.deepcopy(dense), plan)


@pytest.mark.parametrize("tune_experts", [False, True])
def test_distillation_recovery_trains_the_student_towards_the_teacher_and_leaves_the_teacher(tmp_path, tune_experts):
    dense, pruned = pruned_pair()
    with torch.no_grad():  # a random tiny model's distributions are nearly flat: give the student far to go
        dense.lm_head.weight.mul_(20.0)
    teacher_before = copy.deepcopy(dense.state_dict())
    before = copy.deepcopy(pruned.state_dict())
    train = sequences(n=16, seed=3)
    probe = prepare_batch(torch.utils.data.default_collate(train))  # random tokens: the fit's own data
    start = float(distillation_loss(pruned, probe, dense)[1]["kd"])
    recovery = LoRARecovery(pruned, r=0 if tune_experts else 4, alpha=8, lr=1e-2, eval_names=(), teacher=dense,
                            tune_experts=tune_experts)
    trainable = {n for n, p in recovery.model.named_parameters() if p.requires_grad}
    if tune_experts:  # exactly the routed experts' own tensors
        routed = {f"{name}.{p}" for name, m in fmoe.find_experts(pruned).items() for p, _ in m.named_parameters()}
        assert trainable == routed
    trainer(tmp_path, max_epochs=4, limit_val_batches=0).fit(recovery, DataLoader(train, batch_size=4))
    optimized = {id(p) for group in recovery.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in dense.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in dense.state_dict().items())
    merged = recovery.merged()
    end = float(distillation_loss(merged, probe, dense)[1]["kd"])
    assert end < start
    after = merged.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    routers = {k for k in before if k.endswith("mlp.gate.weight")}
    assert changed and not changed & routers
    if tune_experts:
        assert all(".experts." in k for k in changed)


def test_distillation_under_ddp_and_fsdp2_with_a_live_or_cached_teacher(tmp_path):
    from tests.ddp_calibrate import sharp_teacher
    from tests.test_lightning import run_two_processes

    run_two_processes(tmp_path, "distill")
    seen = [json.loads((tmp_path / f"distill_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in seen:  # rank 1's teacher was built empty and filled from rank 0; FSDP2 shards it like the student
        assert rank["ddp_lora"] == rank["ddp_experts"] == {"sharded": False, "filled": True}
        assert rank["fsdp2_lora"] == rank["fsdp2_experts"] == {"sharded": True, "filled": True, "resharded": True}
        assert rank["ddp_cached"] == {"cache": 16}
    models = {name: fmoe.from_pretrained(tmp_path / name).state_dict()
              for name in ("pruned", "ddp_lora", "fsdp2_lora", "ddp_experts", "fsdp2_experts", "ddp_cached")}
    for a, b in (("ddp_lora", "fsdp2_lora"), ("ddp_experts", "fsdp2_experts"), ("ddp_lora", "ddp_cached")):
        assert models[a].keys() == models[b].keys()
        for key in models[a]:
            torch.testing.assert_close(models[b][key], models[a][key], rtol=1e-4, atol=1e-6)
    teacher = sharp_teacher()
    probe = prepare_batch(torch.utils.data.default_collate(sequences(n=16, seed=3)))  # the fits' training data
    # the objective the fits trained on (T=2, kd_weight=0.5) went down on their data; its KL part alone need not
    # (the data loss takes most of the LoRA run's decrease: its KL at T=1 moved by under 1e-3, down with peft 0.21,
    # up with peft 0.22)
    def trained_on(name):
        return float(distillation_loss(fmoe.from_pretrained(tmp_path / name), probe, teacher, 2.0, 0.5)[0])

    start = trained_on("pruned")
    for name in ("ddp_lora", "ddp_experts"):
        assert trained_on(name) < start


def test_a_top_k_cache_gives_the_kl_of_both_distributions_renormalised_over_the_teachers_k_tokens(tmp_path):
    teacher = tiny_model("qwen3_moe")
    student = perturbed(teacher, scale=0.2)
    raw = make_batches(n_batches=1, batch_size=3, seq_len=10, seed=4, pad="mixed")
    cache = cache_teacher(teacher, raw, tmp_path / "top8.safetensors", top_k=8)
    batch = prepare_batch(raw[0])
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    zs, zt = (m(**inputs).logits[:, :-1] for m in (student, teacher))
    real = targets(batch) != -100
    values, ids = zt[real].topk(8, dim=-1)  # [n, 8]
    p_teacher = F.softmax(values / 1.5, -1)
    log_student = F.log_softmax(zs[real].gather(-1, ids) / 1.5, -1)
    expected = 1.5**2 * (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean()
    with pytest.warns(UserWarning, match="top-k teacher cache"):  # kd_weight=1 leaves the tail unconstrained
        LoRARecovery(copy.deepcopy(student), r=2, teacher=tmp_path / "top8.safetensors", eval_names=()).setup("fit")
    loss, parts = distillation_loss(student, batch, copy.deepcopy(cache), 1.5, 1.0)  # a copy reopens the file
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):  # the cache's vocabulary is checked, not only its k
        distillation_loss(tiny_model("qwen3_moe", vocab_size=200), batch, cache)


def test_a_teacher_without_probability_on_a_token_gives_a_finite_kl():
    from fmoe.recovery.distill import _chunk_terms

    student = torch.randn(1, 3, 5, requires_grad=True)  # [B, C, V]
    values = torch.randn(1, 3, 5)
    values[0, :, 2] = float("-inf")  # the teacher rules token 2 out
    kl, nll = _chunk_terms(student, torch.tensor([[1, 3, 4]]), values, temperature=1.0)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
