"""CaloFlow family: config checks, the unit-space and logit maps, the flows' directions (MAF density and inverse,
IAF one-pass sampling), the teacher's loss wiring, training, distillation into the student, checkpoint I/O of both
stages, generation and its conditioning, and the sequential network passes it reports."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from calofm.models.caloflow import CaloFlowConfig, CaloFlowModel
from calofm.models.caloflow_nets import ARFlow, from_unit_space, inverse_logit, logit, normal_cdf, to_unit_space
from calofm.models.shower import condition_features
from calofm.preprocess import ShowerPreprocessor

# Flow II with 8 inverse passes per block (block-autoregressive) keeps the teacher's sampler at ~800 MADE passes;
# the fully autoregressive inverse is checked on a small ARFlow below
TINY = dict(flow1_transforms=2, flow1_hidden=(16,), flow2_transforms=2, flow2_hidden=(16,), bins=4,
            layers_per_step=5, flow2_passes=8)
B = 6


def tiny(**overrides) -> CaloFlowModel:
    torch.manual_seed(0)
    return CaloFlowModel(CaloFlowConfig(**{**TINY, **overrides}))


def student(**overrides) -> CaloFlowModel:
    return tiny(stage="student", distill_from="runs/teacher/model", **overrides)


def showers(n=B, seed=0):
    """Structured cell energies in units of E_inc (a core falling off in r, its z maximum moving with the energy,
    log-normal fluctuations, soft cells removed), conditions, and a preprocessing fitted on them."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, generator=g)
    r, z = torch.arange(9.0)[:, None, None], torch.arange(45.0)[None, None, :]
    core = torch.exp(-r / 1.5) * torch.exp(-((z - 10 - 15 * e[:, None, None, None]) / 6) ** 2)  # (n, 9, 1, 45)
    cells = 5e-4 * core.expand(n, 9, 16, 45) * torch.exp(0.3 * torch.randn(n, 9, 16, 45, generator=g))
    cells = torch.where(cells > 1e-5, cells, torch.zeros_like(cells))
    cond = {"energy": 10 ** (1 + 2 * e), "phi": (torch.rand(n, generator=g) * 2 - 1) * math.pi,
            "theta": torch.rand(n, generator=g) + 1, "geometry": torch.randint(0, 8, (n,), generator=g)}
    pre = ShowerPreprocessor(mode="fraction", noise_cut=2.0).fit([(cells, torch.ones(n))])
    return cells, cond, pre


def batch(n=B, seed=0):
    cells, cond, pre = showers(n, seed)
    return pre.forward(cells, torch.ones(n)), cond, pre


def step_noise(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(n, 9, 16, 45, generator=g), "sigma": torch.rand(n, generator=g),
            "u": torch.rand(n, 2, generator=g)}


def train(model, x, cond, steps, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        losses = model.losses(x, cond, step_noise(x.shape[0], seed=step))
        opt.zero_grad()
        sum(losses.values()).mean().backward()
        opt.step()
        history.append({k: v.mean().item() for k, v in losses.items()})
    return history


@pytest.fixture(scope="module")
def teacher():
    """A tiny teacher trained 25 steps on the structured batch (with its preprocessing)."""
    x, cond, pre = batch(8)
    model = tiny(preprocessing=pre.state_dict())
    train(model, x, cond, 25)
    return model.eval()


def test_builds_losses_and_network_passes():
    model = tiny()
    losses = model.losses(*batch()[:2], step_noise())
    assert set(losses) == {"flow1", "flow2"} and all(v.shape == (B,) and torch.isfinite(v).all()
                                                      for v in losses.values())
    # teacher: flow I fully autoregressive (45 passes per block), flow II 8 passes per block, for each of 45 layers
    assert model.flow1.passes == [45, 45] and model.flow2.passes == [8, 8]
    assert model.network_evaluations() == 2 * 45 + 45 * 2 * 8
    assert student().network_evaluations() == 2 + 45 * 2  # one pass per IAF block
    assert tiny(flow2_passes=None).network_evaluations() == 2 * 45 + 45 * 2 * 144
    with pytest.raises(ValueError, match="one pass"):
        model.check_steps(3)


def test_config_round_trip(tmp_path):
    config = CaloFlowConfig(**TINY, stage="student", distill_from="runs/t/model", geometry_slots={"ild": 2})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CaloFlowConfig) and loaded.flow1_hidden == (16,) and loaded.flow1_passes is None
    fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert {k: loaded.to_dict()[k] for k in fields} == fields and loaded.stage == "student"
    assert CaloFlowConfig.preprocessing_defaults["mode"] == "fraction"
    ShowerPreprocessor(**CaloFlowConfig.preprocessing_defaults)  # valid kwargs


@pytest.mark.parametrize("bad, match", [
    (dict(stage="pupil"), "stage"),
    (dict(distill_from="runs/t"), "'student' only"),
    (dict(stage="student"), "needs distill_from"),
    (dict(student_init="copy"), "student_init"),
    (dict(total_scale=0.0), "total_scale"),
    (dict(noise_level=-1e-6), "noise_level"),
    (dict(alpha=0.5), "alpha"),
    (dict(tail_bound=10.0), "logit range"),
    (dict(bins=1), "bins"),
    (dict(flow1_transforms=0), "flow1_transforms"),
    (dict(flow2_hidden=()), "flow2_hidden"),
    (dict(flow1_hidden=(16, 0)), "flow1_hidden"),
    (dict(flow2_passes=0), "flow2_passes"),
    (dict(layers_per_step=46), "layers_per_step"),
    (dict(mesh_shape=(1, 1, 45)), "cells per layer"),
    (dict(distill_beta=1.5), "distill_beta"),
    (dict(distill_state_weight=-1.0), "distill_state_weight"),
    (dict(hidden=8), "unknown key"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        CaloFlowConfig(**{**TINY, **bad})


def test_unit_space_round_trip_and_formula():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(5, 45, generator=g, dtype=torch.float64) * 0.02
    e[1, 30:] = 0.0  # the tail empty: shares of nothing are 0
    e[2, 0] = 0.0
    u = to_unit_space(e, 1.5)
    assert ((u >= 0) & (u <= 1)).all()
    torch.testing.assert_close(u[:, 0], e.sum(1) / 1.5)
    for i in range(1, 45):  # u_i = E_{i-1} / sum_{j >= i-1} E_j
        remaining = e[:, i - 1:].sum(1)
        torch.testing.assert_close(u[:, i], torch.where(remaining > 0, e[:, i - 1] / remaining, 0.0))
    torch.testing.assert_close(from_unit_space(u, 1.5), e, rtol=1e-12, atol=1e-15)
    # through the logit (alpha = 1e-6) and back, as the model goes layer energies -> Flow I data -> energies
    model = tiny(total_scale=1.5)
    back = model.layer_energies(model.flow1_data(e))
    torch.testing.assert_close(back, e, rtol=1e-5, atol=1e-9)
    v = torch.tensor([0.0, 1e-7, 0.3, 1.0], dtype=torch.float64)
    assert logit(v, 1e-6)[0] == math.log(1e-6 / (1 - 1e-6)) and logit(v, 1e-6).max() < 14
    torch.testing.assert_close(inverse_logit(logit(v, 1e-6), 1e-6), v, atol=1e-12, rtol=0)


def test_flow_directions():
    """MAF: log_prob = change of variables, decode inverts encode with the sequential passes (fully autoregressive
    and with 2 passes); IAF: one pass, block k's spline reads its parameters from its input."""
    torch.manual_seed(0)
    c = torch.randn(4, 3, dtype=torch.float64)
    x = 3 * torch.randn(4, 6, dtype=torch.float64)
    for passes, hidden in ((None, (12,)), (2, (12, 10)), (4, (8,))):
        flow = ARFlow(6, 3, 2, hidden, 4, 14.0, passes).double()
        z, ladj = flow.encode(x, c)
        torch.testing.assert_close(flow.decode(z, c), x)  # the pruned passes of invert_block
        reference = z
        for block in reversed(flow.blocks):
            reference = block(c).inv(reference)  # zuko's own inverse: full MADE passes
        torch.testing.assert_close(flow.decode(z, c), reference)
        jac = torch.autograd.functional.jacobian(lambda t, f=flow: f.encode(t[None], c[:1])[0][0], x[0])
        torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(flow.log_prob(x, c), ladj - 0.5 * (z**2 + math.log(2 * math.pi)).sum(1))
    assert flow.passes == [4, 4]
    x_hat, states = flow.iaf_decode(z, c, states=True)
    assert torch.equal(states[0], x_hat) and torch.equal(states[-1], z) and len(states) == 3
    block = flow.blocks[1]  # the last block acts first on the noise
    torch.testing.assert_close(block.meta(c, z)(states[1]), z)  # spline forward, parameters from z: back to z
    jac = torch.autograd.functional.jacobian(lambda t: flow.iaf_decode(t[None], c[:1])[0], z[0])
    assert torch.count_nonzero(jac.triu(1)) > 0 and torch.count_nonzero(jac.tril(-1)) > 0  # two opposite orders


def test_teacher_loss_formula_from_the_noise():
    """Flow I and Flow II inputs rebuilt by hand from the cells, the dequantisation uniforms Phi(noise) and the
    layer offset floor(u 45); the losses are their negative log-likelihoods per dimension."""
    model = tiny()
    cells, cond, pre = showers()
    model.config.preprocessing = pre.state_dict()
    x, noise = pre.forward(cells, torch.ones(B)), step_noise()
    losses = model.losses(x, cond, noise)
    cfg = model.config

    def logit_(v):  # logit(alpha + (1 - 2 alpha) v), float64
        v = 1e-6 + (1 - 2e-6) * v
        return torch.log(v / (1 - v))

    deq = cells.double() + 1e-6 * 0.5 * (1 + torch.erf(noise["noise"].double() / math.sqrt(2)))
    e = deq.sum(dim=(1, 2))
    remaining = e.flip(1).cumsum(1).flip(1)
    u = torch.cat([e.sum(1, keepdim=True), e[:, :-1] / remaining[:, :-1]], dim=1)
    c = condition_features(cond, 8)
    with torch.no_grad():
        nll1 = -model.flow1.log_prob(logit_(u).float(), c) / 45
        torch.testing.assert_close(losses["flow1"], nll1, rtol=1e-4, atol=1e-4)
        expected = torch.zeros(B)
        for i in range(B):
            offset = int(noise["u"][i, 0] * 45)
            for layer in [(offset + 9 * j) % 45 for j in range(5)]:
                v = logit_(deq[i, ..., layer].flatten() / e[i, layer])
                prev = logit_(deq[i, ..., layer - 1].flatten() / e[i, layer - 1]) if layer else torch.zeros(144)
                le_prev = torch.log10(e[i, layer - 1]) / 3 if layer else torch.tensor(0.0)
                ctx = torch.cat([c[i], torch.nn.functional.one_hot(torch.tensor(layer), 45).float(),
                                 torch.stack([torch.log10(e[i, layer]) / 3, le_prev]).float(),
                                 prev.float() / cfg.tail_bound])
                expected[i] -= model.flow2.log_prob(v[None].float(), ctx[None])[0] / (5 * 144)
        torch.testing.assert_close(losses["flow2"], expected, rtol=1e-4, atol=1e-4)
    torch.manual_seed(123)  # all randomness comes from `noise`
    again = model.losses(x, cond, noise)
    assert all(torch.equal(again[k], losses[k]) for k in losses)


def test_teacher_training_lowers_both_likelihood_losses():
    x, cond, pre = batch(8)
    model = tiny(preprocessing=pre.state_dict())
    history = train(model, x, cond, 25)
    for name in ("flow1", "flow2"):
        first, last = history[0][name], sum(h[name] for h in history[-3:]) / 3
        assert last < 0.4 * first, (name, first, last)


def test_generate_shape_reproducible_conditioned_and_zero_cells(teacher):
    cond = batch()[1]
    pre = teacher.preprocessor()

    def gen(seed, c=cond, model=teacher):
        return model.generate(c, torch.Generator().manual_seed(seed))

    y = gen(0)
    assert y.shape == (B, 9, 16, 45) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.equal(gen(0), y) and not torch.allclose(gen(1), y)
    assert not torch.allclose(gen(0, {**cond, "energy": cond["energy"] * 3}), y)  # the energy matters
    assert not torch.allclose(gen(0, {**cond, "geometry": (cond["geometry"] + 1) % 8}), y)  # and the geometry
    # cells generated as 0 sit at the log floor and come back as exactly 0 MeV; the others are >= the cut
    floor = (math.log(pre.eps) - pre.mean) / pre.std
    e_inc = cond["energy"] * 1e3
    mev = pre.inverse(y, e_inc)
    zero = (y - floor).abs() < 1e-5
    assert zero.any() and (~zero).any() and (mev[zero] == 0).all()
    cut = pre.noise_cut * pre.eps * e_inc[:, None, None, None].expand_as(y)  # cut in generate, not by the inverse
    assert (mev[~zero] >= cut[~zero] * (1 - 1e-4)).all()
    assert (mev.sum(dim=(1, 2, 3)) <= teacher.config.total_scale * e_inc * (1 + 1e-4)).all()
    # the student samples through its IAFs
    pupil = student(preprocessing=teacher.config.preprocessing)
    pupil.init_training(teacher=teacher)
    ys = gen(0, model=pupil.eval())
    assert ys.shape == y.shape and torch.isfinite(ys).all() and torch.equal(gen(0, model=pupil), ys)
    assert not torch.allclose(ys, y)  # a different sampler (IAF instead of the MAF inverse)
    assert not torch.allclose(gen(0, {**cond, "energy": cond["energy"] * 3}, pupil), ys)
    with pytest.raises(ValueError, match="one pass"):
        teacher.generate(cond, None, steps=3)


def test_generate_makes_the_reported_network_passes(teacher):
    cond = {k: v[:2] for k, v in batch()[1].items()}
    pupil = student()
    pupil.init_training(teacher=teacher)
    for model in (teacher, pupil.eval()):
        calls = []
        # the input layer's activation runs once per MADE evaluation (full, or pruned in the MAF inverse)
        hooks = [b.hyper[1].register_forward_hook(lambda *a, seen=calls: seen.append(1))
                 for flow in (model.flow1, model.flow2) for b in flow.blocks]
        model.generate(cond, torch.Generator().manual_seed(0))
        for h in hooks:
            h.remove()
        assert len(calls) == model.network_evaluations()


def test_save_load_identical_teacher(tmp_path, teacher):
    teacher.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CaloFlowModel) and loaded.dtype == torch.float32 and loaded.config.stage == "teacher"
    x, cond, _ = batch()
    assert torch.equal(loaded.generate(cond, torch.Generator().manual_seed(0)),
                       teacher.generate(cond, torch.Generator().manual_seed(0)))
    la, lb = teacher.losses(x, cond, step_noise()), loaded.losses(x, cond, step_noise())
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_distillation_lowers_the_student_loss_and_saves_without_the_teacher(tmp_path, teacher):
    x, cond, pre = batch(8)
    teacher.zero_grad(set_to_none=True)  # (left from the fixture's training)
    before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    pupil = student(student_init="random", preprocessing=pre.state_dict())
    with pytest.raises(ValueError, match="init_training"):
        pupil.losses(x, cond, step_noise(8))
    pupil.init_training(teacher=teacher)
    assert not any(k.startswith("_teacher") for k in pupil.state_dict())  # unregistered: not saved, not trained
    assert sum(p.numel() for p in pupil.parameters()) == sum(p.numel() for p in teacher.parameters())
    losses = pupil.losses(x, cond, step_noise(8))
    assert set(losses) == {"flow1_x", "flow1_z", "flow2_x", "flow2_z"}
    # the x-loss by hand for Flow I: beta |student(teacher^-1(w)) - w|^2 per dimension
    with torch.no_grad():
        inp = pupil.flow_inputs(x, cond, step_noise(8))
        ref = pupil.flow1.iaf_decode(teacher.flow1.encode(inp["w"], inp["c"])[0], inp["c"])
        torch.testing.assert_close(losses["flow1_x"], 0.5 * (ref - inp["w"]).square().mean(1))
    history = train(pupil, x, cond, 20)
    for name in ("flow1_x", "flow1_z", "flow2_x", "flow2_z"):
        first, last = history[0][name], sum(h[name] for h in history[-3:]) / 3
        assert last < 0.5 * first, (name, first, last)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and all(p.grad is None for p in teacher.parameters())
    # starting from the teacher's weights: the student's flows equal the teacher's, and the loss starts lower
    warm = student(preprocessing=pre.state_dict())
    warm.init_training(teacher=teacher)
    assert torch.equal(warm.flow2.blocks[0].hyper[0].weight, teacher.flow2.blocks[0].hyper[0].weight)
    assert sum(warm.losses(x, cond, step_noise(8, 0)).values()).mean() < sum(history[0].values())
    pupil.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.stage == "student" and loaded._teacher is None
    assert torch.equal(loaded.generate(cond, torch.Generator().manual_seed(0)),
                       pupil.generate(cond, torch.Generator().manual_seed(0)))


def test_fully_guided_states_and_init_training_refusals(teacher):
    x, cond, pre = batch()
    pupil = student(distill_state_weight=1.0, preprocessing=pre.state_dict())
    pupil.init_training(teacher=teacher)
    losses = pupil.losses(x, cond, step_noise())
    assert {"flow1_states", "flow2_states"} <= set(losses) and all(torch.isfinite(v).all() for v in losses.values())
    with pytest.raises(ValueError, match="teacher"):
        tiny().init_training(teacher=teacher)  # a teacher-stage model does not distil
    with pytest.raises(ValueError, match="needs its teacher"):
        student().init_training(teacher=None)
    with pytest.raises(ValueError, match="stage 'teacher'"):
        student().init_training(teacher=pupil)
    with pytest.raises(ValueError, match="flow2_transforms"):
        student(flow2_transforms=3).init_training(teacher=teacher)
    with pytest.raises(ValueError, match="student_init 'random'"):
        student(flow2_hidden=(24,)).init_training(teacher=teacher)
    student(flow2_hidden=(24,), student_init="random").init_training(teacher=teacher)  # wider, fresh: fine


def test_bf16_autocast_and_normal_cdf():
    model = tiny()
    x, cond, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses(x, cond, step_noise())
        y = model.generate({k: v[:2] for k, v in cond.items()}, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in losses.values())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    n = torch.tensor([-1.0, 0.0, 1.96])
    torch.testing.assert_close(normal_cdf(n), torch.tensor([0.158655, 0.5, 0.975002]), atol=1e-5, rtol=0)
