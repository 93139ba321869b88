"""CaloClouds: config checks, mesh <-> points, the flow's summary, the losses against their formulas, training,
consistency distillation, checkpoint I/O and conditioning."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from calofm.diffusion import EDMPrecond, edm_loss
from calofm.ema import EMA
from calofm.models.caloclouds import CaloCloudsConfig, CaloCloudsModel, masked_edm_loss
from calofm.models.caloclouds_nets import (
    LOG_FLOOR,
    ConcatSquashLinear,
    assemble,
    decode_summary,
    encode_points,
    mesh_to_points,
    points_to_mesh,
    summary,
)
from calofm.models.shower import condition_features
from calofm.preprocess import ShowerPreprocessor

MESH = (9, 16, 45)
# 64 points, a 16-32-16 point network and a 2-transform flow: 81k parameters, fast on one CPU thread
TINY = dict(max_points=64, point_hidden=(16, 32, 16), time_features=16, flow_transforms=2, flow_hidden=(16, 16),
            sample_steps=3, consistency_grid=6)


def showers(batch, seed=0, energy=None):
    """MeV showers with structure: a radial exponential times a longitudinal gamma profile, 2.5% of E_inc visible,
    log-normal cell fluctuations, cells below 0.05 MeV empty (more hits at higher energy)."""
    g = torch.Generator().manual_seed(seed)
    e = 10 ** (torch.rand(batch, generator=g) * 1.5 + 0.5) if energy is None else torch.full((batch,), float(energy))
    r, z = torch.arange(9) + 0.5, torch.arange(45) + 0.5
    shape = torch.exp(-r / 1.5)[:, None, None] * (z**2 * torch.exp(-z / 4))[None, None, :] * torch.ones(1, 16, 1)
    fluctuation = torch.exp(0.5 * torch.randn(batch, *MESH, generator=g))
    cells = 25.0 * e.reshape(-1, 1, 1, 1) * shape / shape.sum() * fluctuation
    return torch.where(cells > 0.05, cells, torch.zeros_like(cells)), e


PRE = ShowerPreprocessor(**CaloCloudsConfig.preprocessing_defaults).fit(
    [(s, e * 1e3) for s, e in (showers(64, seed) for seed in range(2))])


def tiny(seed=0, **overrides) -> CaloCloudsModel:
    torch.manual_seed(seed)
    return CaloCloudsModel(CaloCloudsConfig(**{**TINY, "preprocessing": PRE.state_dict(), **overrides})).eval()


def conditions(batch, seed=0, energy=None, geometry=None):
    g = torch.Generator().manual_seed(seed)
    cond = {
        "energy": 10 ** (torch.rand(batch, generator=g) * 1.5 + 0.5),  # GeV
        "phi": (torch.rand(batch, generator=g) * 2 - 1) * math.pi,
        "theta": torch.rand(batch, generator=g) + 1,
        "geometry": torch.randint(0, 3, (batch,), generator=g),
    }
    if energy is not None:
        cond["energy"] = torch.full((batch,), float(energy))
    if geometry is not None:
        cond["geometry"] = torch.full((batch,), geometry)
    return cond


def data(batch, seed=0):
    """(model-space showers, conditions) of synthetic showers."""
    mev, e = showers(batch, seed)
    return PRE.forward(mev, e * 1e3), {**conditions(batch, seed), "energy": e}


def step_noise(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(batch, *MESH, generator=g),
            "sigma": (torch.randn(batch, generator=g) * 1.2 - 1.2).exp(), "u": torch.rand(batch, 2, generator=g)}


# -- config -------------------------------------------------------------------------------------------------------


def test_defaults_config_round_trip_and_counts(tmp_path):
    model = CaloCloudsModel(CaloCloudsConfig())
    assert model.default_steps == 13 and model.network_evaluations() == 25 + 8  # Heun 2N - 1, 4 coupling x 2
    assert model.network_evaluations(1) == 1 + 8
    assert CaloCloudsConfig.preprocessing_defaults == {"mode": "fraction", "noise_cut": 2.0}
    student = CaloCloudsModel(CaloCloudsConfig(distill_from="runs/teacher/model"))
    assert student.default_steps == 1 and student.network_evaluations() == 1 + 8
    with pytest.raises(ValueError, match="one pass"):
        student.network_evaluations(4)
    config = CaloCloudsConfig(**TINY, preprocessing=PRE.state_dict(), geometry_slots={"par04_siw": 0},
                              geometry_thresholds={"par04_siw": 5e-4}, distill_from="somewhere")
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, CaloCloudsConfig) and again.point_hidden == (16, 32, 16) and again.is_student
    assert {k: v for k, v in again.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize("bad", [
    dict(max_points=0), dict(max_points=1598),  # 4 x 1598 + 92 > 6480 numbers of step noise per shower
    dict(point_hidden=()), dict(point_hidden=(16, 0)), dict(time_features=15), dict(fourier_scale=0.0),
    dict(flow_transforms=0), dict(flow_hidden=(8, -1)), dict(flow_bins=1), dict(sample_steps=0),
    dict(cell_offset="corner"), dict(cog_calibration="yes"), dict(consistency_grid=1), dict(distill_from=""),
    dict(sigma_min=100.0), dict(sigma_data=0.0), dict(P_std=0.0), dict(unknown_field=3),
    dict(preprocessing={**PRE.state_dict(), "noise_cut": 0.0}),  # empty cells would not invert to exactly 0
    dict(preprocessing=ShowerPreprocessor(mode="logit").state_dict()),
])
def test_bad_config_values_raise(bad):
    with pytest.raises(ValueError):
        CaloCloudsConfig(**bad)


# -- mesh <-> points, the flow's summary, calibration ---------------------------------------------------------------


@pytest.mark.parametrize("offsets", [None, "uniform"])
def test_mesh_points_mesh_round_trip_keeps_every_cell(offsets):
    mev, e = showers(6, seed=3, energy=80.0)
    frac = PRE.inverse(PRE.forward(mev, e * 1e3), torch.ones(6))
    hits = (frac > 0).sum(dim=(1, 2, 3))
    assert hits.min() > 64  # more hit cells than the tiny max_points
    off = None if offsets is None else torch.rand(6, 2, generator=torch.Generator().manual_seed(0)) * 0.998 + 0.001
    xy, layer, energy, mask = mesh_to_points(frac, 6480, off)
    assert torch.equal(mask.sum(dim=1), hits)
    assert torch.equal(points_to_mesh(xy, layer, energy, mask, MESH), frac)  # every cell exactly
    if offsets is None:  # cell centres: r = ring + 1/2, phi = (bin + 1/2) 2 pi / 16
        r, phi = xy.norm(dim=-1)[mask], torch.atan2(xy[..., 1], xy[..., 0])[mask] % (2 * math.pi)
        torch.testing.assert_close(r - r.floor(), torch.full_like(r, 0.5), atol=1e-5, rtol=0)
        bins = phi / (2 * math.pi / 16)
        torch.testing.assert_close(bins - bins.floor(), torch.full_like(bins, 0.5), atol=1e-4, rtol=0)
    # max_points keeps the most energetic cells
    xy, layer, energy, mask = mesh_to_points(frac, 64, off)
    assert mask.all() and torch.equal(energy, frac.flatten(1).topk(64, dim=1).values)
    kept = points_to_mesh(xy, layer, energy, mask, MESH)
    assert torch.equal(kept, torch.where(kept > 0, frac, torch.zeros_like(frac)))
    feats = encode_points(xy, layer, energy, mask, MESH)
    assert feats.abs().max() < 2 and torch.equal(((feats[..., 2] + 1) / 2 * 45 - 0.5).round().long(), layer)


def test_summary_decodes_to_counts_and_layer_energies():
    mev, e = showers(5, seed=1)
    frac = PRE.inverse(PRE.forward(mev, e * 1e3), torch.ones(5))
    counts = (frac > 0).sum(dim=(1, 2))
    g = torch.Generator().manual_seed(2)
    v = summary(frac, counts, torch.rand(5, 45, generator=g) * 0.98 + 0.01, torch.rand(5, 45, generator=g))
    assert v.shape == (5, 92) and v.abs().max() < 3
    dec_counts, dec_energy, cog = decode_summary(v, MESH, max_points=6480)
    assert torch.equal(dec_counts, counts)
    layers = frac.sum(dim=(1, 2))
    assert torch.equal(dec_energy == 0, layers == 0)  # empty layers decode to exactly 0
    torch.testing.assert_close(dec_energy, layers, atol=0.6 * LOG_FLOOR, rtol=1e-5)
    assert cog.shape == (5, 2) and cog.abs().max() < 1  # a shower on the axis
    capped = decode_summary(v, MESH, max_points=100)[0]
    assert (capped.sum(dim=1) <= 100).all() and (capped <= counts).all()


def test_assemble_assigns_layers_by_z_and_rescales_layer_energies():
    counts = torch.zeros(1, 45, dtype=torch.long)
    counts[0, 3], counts[0, 10] = 2, 3
    energies = torch.zeros(1, 45)
    energies[0, 3], energies[0, 10] = 0.02, 0.05
    # 6 points: the 5 lowest z go to the layers (2 to layer 3, then 3 to layer 10), the sixth is padding
    z = torch.tensor([0.9, -0.5, 0.1, -0.9, 0.3, -1.0])
    xy = torch.tensor([[0.5, 0.0], [1.5, 0.0], [2.5, 0.0], [3.5, 0.0], [4.5, 0.0], [5.5, 0.0]]) / 9
    e = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    points = torch.cat([xy, z[:, None], e[:, None]], dim=1)[None]
    points[0, 5, 2] = 2.0  # the sixth point sorts last
    mesh = assemble(points, counts, energies, None, MESH)
    layer3, layer10 = mesh[0, :, 0, 3], mesh[0, :, 0, 10]
    torch.testing.assert_close(mesh.sum(dim=(1, 2))[0], energies[0])
    assert layer3.nonzero().flatten().tolist() == [1, 3] and layer10.nonzero().flatten().tolist() == [0, 2, 4]
    # relative energies within a layer follow the points' energy code: exp(4 x 0.5) more in ring 2
    assert layer10[2] / layer10[0] == pytest.approx(math.exp(2.0), rel=1e-4)
    shifted = assemble(points, counts, energies, torch.tensor([[6.0, 0.0]]), MESH)  # CoG x from 2.4 to 6
    r = torch.arange(9) + 0.5
    assert (shifted.sum(dim=(2, 3))[0] * r).sum() / shifted.sum() > (mesh.sum(dim=(2, 3))[0] * r).sum() / mesh.sum()


# -- the networks and losses against their formulas ----------------------------------------------------------------


def test_concat_squash_is_the_papers_layer_and_the_net_is_point_wise():
    torch.manual_seed(0)
    layer = ConcatSquashLinear(4, 8, 5)
    x, ctx = torch.randn(3, 7, 4), torch.randn(3, 1, 5)
    paper = layer.layer(x) * torch.sigmoid(layer.hyper_gate(ctx)) + layer.hyper_bias(ctx)
    torch.testing.assert_close(layer(x, ctx), paper)
    net = tiny().point_net
    pts, c_noise, cond = torch.randn(2, 10, 4), torch.randn(2), torch.randn(2, 13)
    out = net(pts, c_noise, cond)
    perm = torch.randperm(10)
    torch.testing.assert_close(net(pts[:, perm], c_noise, cond), out[:, perm])  # permutation-equivariant
    torch.testing.assert_close(net(pts[:, :3], c_noise, cond), out[:, :3])  # each point on its own




def test_point_loss_is_the_masked_edm_loss_on_the_step_noise():
    model = tiny()
    x, cond = data(3, seed=4)
    noise = step_noise(3, 5)
    batch = model.point_batch(x, cond, noise)
    m = batch.points.shape[1]
    assert m == batch.mask.sum(dim=1).max() and m <= 64
    torch.testing.assert_close(batch.noise, noise["noise"].flatten(1)[:, :4 * m].reshape(3, m, 4))
    torch.testing.assert_close(batch.features, condition_features(cond, model.config.n_geometry_slots))
    torch.testing.assert_close(batch.context[:, -1], batch.mask.sum(dim=1) / 64 * 2 - 1.0)
    precond = EDMPrecond(model.point_net, model.config)
    loss = model.losses(x, cond, noise)
    assert set(loss) == {"points", "flow"} and all(v.shape == (3,) for v in loss.values())
    # all points real: calofm's EDM loss exactly
    full = torch.ones_like(batch.mask)
    torch.testing.assert_close(
        masked_edm_loss(precond, batch.points, full, batch.context, noise["sigma"], batch.noise),
        edm_loss(precond, batch.points, {"cond": batch.context}, sigma=noise["sigma"], noise=batch.noise))
    # padding points change nothing; the formula by hand
    pad = torch.cat([batch.points, torch.randn(3, 5, 4)], dim=1)
    mask = torch.cat([batch.mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    z = torch.cat([batch.noise, torch.randn(3, 5, 4)], dim=1)
    sigma = noise["sigma"]
    got = masked_edm_loss(precond, pad, mask, batch.context, sigma, z)
    torch.testing.assert_close(got, loss["points"])
    s = sigma[:, None, None]
    sd = 0.5
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    xn = batch.points + s * batch.noise
    d = c_skip * xn + c_out * model.point_net(c_in * xn, sigma.log() / 4, batch.context)
    per = ((d - batch.points) ** 2).mean(dim=-1)
    expected = (sigma**2 + sd**2) / (sigma * sd) ** 2 * (per * batch.mask).sum(1) / batch.mask.sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss["flow"], -model.flow.log_prob(batch.summary, batch.features) / 92)


# -- training, checkpoints, generation ------------------------------------------------------------------------------


def test_losses_fall_with_adamw():
    torch.manual_seed(0)
    model = tiny().train()
    x, cond = data(8, seed=6)
    evaluation = [step_noise(8, 1000 + i) for i in range(3)]

    def held_out():
        with torch.no_grad():
            parts = [model.losses(x, cond, n) for n in evaluation]
        return {k: sum(p[k].mean().item() for p in parts) / len(parts) for k in parts[0]}

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        opt.zero_grad()
        sum(model.losses(x, cond, step_noise(8, step)).values()).mean().backward()
        opt.step()
    after = held_out()
    assert after["points"] < 0.8 * before["points"] and after["flow"] < before["flow"] - 0.3, (before, after)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast runs and stays finite
        assert all(torch.isfinite(v).all() for v in model.losses(x, cond, evaluation[0]).values())


def perturbed(model):
    with torch.no_grad():  # move every weight off its initial value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_save_load_identical_teacher_and_student(tmp_path):
    teacher = perturbed(tiny())
    teacher.save_pretrained(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "model.safetensors").exists()
    student = tiny(1, distill_from=str(tmp_path / "teacher"))
    student.init_training(teacher=AutoModel.from_pretrained(tmp_path / "teacher").eval())
    perturbed(student.point_net)
    student.save_pretrained(tmp_path / "student")
    cond = conditions(3)
    for model, folder, steps in ((teacher, "teacher", 2), (student, "student", None)):
        loaded = AutoModel.from_pretrained(tmp_path / folder).eval()
        assert isinstance(loaded, CaloCloudsModel) and loaded.config.is_student == (folder == "student")
        assert torch.equal(loaded.generate(cond, torch.Generator().manual_seed(1), steps=steps),
                           model.generate(cond, torch.Generator().manual_seed(1), steps=steps))
    assert "_teacher" not in AutoModel.from_pretrained(tmp_path / "student").__dict__


def test_generate_is_finite_reproducible_conditioned_and_inverts_to_exact_zeros():
    model = tiny()

    def sample(seed, **kw):
        return model.generate(conditions(2, **kw), torch.Generator().manual_seed(seed), steps=2)

    a = sample(0, energy=5.0, geometry=0)
    assert a.shape == (2, *MESH) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, sample(0, energy=5.0, geometry=0))
    assert not torch.equal(a, sample(1, energy=5.0, geometry=0))
    assert (a - sample(0, energy=500.0, geometry=0)).abs().max() > 1e-3  # the energy condition matters
    assert (a - sample(0, energy=5.0, geometry=1)).abs().max() > 1e-3  # so does the geometry slot
    # the shared inverse gives exactly 0 in every cell no point landed in (and in those holding less than the noise
    # cut), so at most max_points hits per shower
    empty = (a - (math.log(PRE.eps) - PRE.mean) / PRE.std).abs() < 1e-5
    mev = PRE.inverse(a, torch.full((2,), 5e3))
    assert (mev[empty] == 0).all() and empty.sum() >= 2 * (6480 - 64)
    assert ((mev > 0).sum(dim=(1, 2, 3)) <= 64).all() and (mev > 0).any()


def test_network_evaluations_count_point_and_flow_passes():
    model = tiny()
    calls = {"point": 0, "flow": 0}
    model.point_net.register_forward_hook(lambda *a: calls.__setitem__("point", calls["point"] + 1))
    for t in model.flow.flow.transform.transforms:
        t.hyper.register_forward_hook(lambda *a: calls.__setitem__("flow", calls["flow"] + 1))
    model.generate(conditions(2), torch.Generator().manual_seed(0), steps=3)
    assert calls["point"] == 5 and calls["flow"] == 4 and model.network_evaluations(3) == 9


# -- consistency distillation ---------------------------------------------------------------------------------------


def test_student_starts_from_its_teacher_and_refuses_bad_pairs():
    teacher = perturbed(tiny())
    with pytest.raises(ValueError, match="distill_from is not set"):
        tiny().init_training(teacher=teacher)
    student = tiny(1, distill_from="t")
    with pytest.raises(ValueError, match="needs its teacher"):
        student.init_training()
    with pytest.raises(ValueError, match="max_points"):
        tiny(distill_from="t", max_points=32).init_training(teacher=teacher)
    with pytest.raises(ValueError, match="not a student"):
        student.init_training(teacher=tiny(distill_from="t"))
    student.init_training(teacher=teacher)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in student.flow.parameters())
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        n for n, _ in student.named_parameters() if n.startswith("point_net.")}
    assert set(student.state_dict()) == set(teacher.state_dict())  # the teacher is no submodule
    with pytest.raises(ValueError, match="EMA target"):
        student.losses(*data(2), step_noise(2, 0))


def test_distillation_steps_reduce_the_consistency_loss():
    teacher = tiny()
    x, cond = data(8, seed=7)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(10):  # a briefly trained teacher
        opt.zero_grad()
        sum(teacher.train().losses(x, cond, step_noise(8, step)).values()).mean().backward()
        opt.step()
    student = tiny(1, distill_from="t").train()
    student.init_training(teacher=teacher.eval())
    ema = EMA(student, decay=0.9)
    evaluation = [step_noise(8, 2000 + i) for i in range(3)]

    def held_out():
        with torch.no_grad():
            return sum(student.losses(x, cond, n, ema=ema.shadow)["consistency"].mean().item()
                       for n in evaluation) / len(evaluation)

    before = held_out()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3)
    for step in range(20):
        opt.zero_grad()
        loss = student.losses(x, cond, step_noise(8, 100 + step), ema=ema.shadow)
        assert set(loss) == {"consistency"}
        loss["consistency"].mean().backward()
        opt.step()
        ema.update(student)
    after = held_out()
    assert after < 0.85 * before, (before, after)  # 0.41 -> 0.33 (a 6-point grid, 8 showers, 20 steps)
    calls = []
    student.point_net.register_forward_hook(lambda *a: calls.append(1))
    out = student.eval().generate(conditions(2), torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and len(calls) == 1  # one point-network pass
