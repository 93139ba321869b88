"""The energy-factorised variant's transforms: the 'layer' shower mode, ProfilePreprocessor and ModelSpace."""

import json
import math

import pytest
import torch

from calofm.models import preset_config
from calofm.preprocess import ModelSpace, ProfilePreprocessor, RunningStats, ShowerPreprocessor


def showers(batch=6, seed=0, empty_layers=(40, 41, 42, 43, 44)):
    """Sparse log-normal MeV showers with some always-empty layers, and E_inc 1 GeV - 1 TeV in MeV (float64)."""
    g = torch.Generator().manual_seed(seed)
    energy = 10 ** (3 + 3 * torch.rand(batch, generator=g, dtype=torch.float64))
    cells = torch.exp(torch.randn(batch, 9, 16, 45, generator=g, dtype=torch.float64) * 2 - 3)
    cells = cells * (energy / 1e4).reshape(-1, 1, 1, 1)
    cells[torch.rand(cells.shape, generator=g) < 0.6] = 0
    cells[..., list(empty_layers)] = 0
    return cells, energy


def test_layer_mode_inverse_is_exact_and_every_layer_keeps_its_energy():
    x, energy = showers()
    pre = ShowerPreprocessor(mode="layer", eps=1e-6).fit([(x, energy)])
    layers = x.sum(dim=(1, 2))
    y = pre.forward(x, energy)
    torch.testing.assert_close(pre.inverse(y, energy, layers=layers), x, rtol=1e-10, atol=1e-12)
    # a model's output is only approximately right: each layer is still rescaled to exactly its energy
    noisy = pre.inverse(y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                                              dtype=y.dtype), energy, layers=layers)
    torch.testing.assert_close(noisy.sum(dim=(1, 2)), layers, rtol=1e-10, atol=1e-9)
    assert (noisy[..., 40:] == 0).all()  # empty layers stay empty


def test_layer_mode_threshold_then_exact_rescale():
    x, energy = showers()
    pre = ShowerPreprocessor(mode="layer", eps=1e-6).fit([(x, energy)])
    layers = x.sum(dim=(1, 2))
    threshold = torch.quantile(x[x > 0], 0.3).item()  # cuts ~30 % of the hits
    back = pre.inverse(pre.forward(x, energy), energy, threshold=threshold, layers=layers)
    hit = back > 0
    assert (back[hit] >= threshold).all()  # no surviving cell below the readout threshold ...
    alive = layers * (x >= threshold).any(dim=(1, 2))  # ... and every layer with a cell left holds its energy
    torch.testing.assert_close(back.sum(dim=(1, 2)), alive, rtol=1e-10, atol=1e-9)
    # a layer whose whole energy is below the threshold ends empty, as in the detector
    low = torch.zeros(1, 45, dtype=torch.float64)
    low[0, 0] = threshold / 2
    assert pre.inverse(pre.forward(x[:1], energy[:1]), energy[:1], threshold=threshold, layers=low).sum() == 0
    # the surviving cells keep their relative sizes: scaled by one factor per layer
    ratio = torch.where(hit, back / x.clamp_min(1e-300), torch.zeros_like(back))
    for b, z in ((0, 3), (2, 10), (5, 20)):
        r = ratio[b, :, :, z][hit[b, :, :, z]]
        if len(r) > 1:
            assert (r.max() / r.min() - 1).abs() < 1e-9


def test_fraction_mode_with_layer_energies_is_rescaled_exactly():
    x, energy = showers()
    pre = ShowerPreprocessor(mode="fraction", eps=1e-6).fit([(x, energy)])
    layers = 1.3 * x.sum(dim=(1, 2))  # the energy model asks for 30 % more in every layer
    back = pre.inverse(pre.forward(x, energy), energy, layers=layers)
    torch.testing.assert_close(back.sum(dim=(1, 2)), layers, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(back, 1.3 * x, rtol=1e-9, atol=1e-12)  # the shape itself is untouched


def test_layer_mode_is_finite_for_any_network_output():
    pre = ShowerPreprocessor(mode="layer", eps=1e-6, mean=-10.0, std=3.0)
    y = torch.tensor([1e4, -1e4, 0.0]).repeat(2, 9, 16, 15)  # wild outputs, (2, 9, 16, 45)
    layers = torch.full((2, 45), 100.0, dtype=torch.float64)
    out = pre.inverse(y.double(), torch.full((2,), 1e4), layers=layers)
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=(1, 2)), layers)  # an all-empty layer: one cell takes the energy
    assert ((out > 0).sum(dim=(1, 2)) >= 1).all()
    with pytest.raises(ValueError, match="layer energies"):
        pre.inverse(y, torch.ones(2))


def profile_batches():
    """(name, slot, layers, E_inc) batches of two geometries with a 5x different visible fraction."""
    a, ea = showers(batch=40, seed=1)
    b, eb = showers(batch=30, seed=2, empty_layers=range(30, 45))
    la, lb = a.sum(dim=(1, 2)), 5 * b.sum(dim=(1, 2))
    return [("siw", 0, la[:25], ea[:25]), ("ild", 2, lb, eb), ("siw", 0, la[25:], ea[25:])], (la, ea), (lb, eb)


def test_profile_round_trip_and_per_geometry_standardisation():
    batches, (la, ea), (lb, eb) = profile_batches()
    pp = ProfilePreprocessor(eps=1e-6).fit(batches)
    assert pp.geometries == {"siw": 0, "ild": 2} and pp.width == 46
    for layers, energy, slot in ((la, ea, 0), (lb, eb, 2)):
        slots = torch.full((len(energy),), slot)
        y = pp(layers, energy, slots)
        # standardised per geometry: every column with spread has mean 0 and std 1 in its own geometry
        spread = torch.tensor(pp.stats["siw" if slot == 0 else "ild"]["std"]) != 1.0
        torch.testing.assert_close(y.mean(0)[spread], torch.zeros(int(spread.sum()), dtype=y.dtype), atol=1e-9,
                                   rtol=0)
        torch.testing.assert_close(y.std(0, correction=0)[spread], torch.ones(int(spread.sum()), dtype=y.dtype))
        torch.testing.assert_close(pp.inverse(y, energy, slots), layers, rtol=1e-9, atol=1e-6)
    # columns 31..45 (layers 30..44) are always empty in "ild": std 1, so they carry no signal
    assert pp.stats["ild"]["std"][31:] == [1.0] * 15
    # the total is coordinate 0: log(E_vis / E_inc)
    v = pp.features(la, ea)
    torch.testing.assert_close(v[:, 0], torch.log(la.sum(1) / ea))


def test_profile_inverse_gives_the_sampled_total_for_any_output():
    batches, (la, ea), _ = profile_batches()
    pp = ProfilePreprocessor(eps=1e-6).fit(batches)
    y = torch.randn(len(ea), 46, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    y[0] = 1e3  # a wild output: clamped, finite, the total at most E_inc
    layers = pp.inverse(y, ea, torch.zeros(len(ea), dtype=torch.long))
    assert torch.isfinite(layers).all() and (layers >= 0).all()
    mean, std = torch.tensor(pp.stats["siw"]["mean"]), torch.tensor(pp.stats["siw"]["std"])
    total = ea * torch.exp((y[:, 0] * std[0] + mean[0]).clamp_max(0))
    torch.testing.assert_close(layers.sum(1), total)
    assert layers[0].sum() <= ea[0] * (1 + 1e-12)


def test_profile_errors_and_state_round_trip(tmp_path):
    batches, (la, ea), _ = profile_batches()
    pp = ProfilePreprocessor(eps=1e-5, noise_cut=2.0).fit(batches)
    with pytest.raises(ValueError, match="slot"):
        pp(la, ea, torch.full((len(ea),), 5))  # a geometry the statistics do not know
    with pytest.raises(ValueError, match="taken"):
        ProfilePreprocessor().fit([("a", 0, la, ea), ("b", 0, la, ea)])
    with pytest.raises(ValueError, match="two showers"):
        ProfilePreprocessor().fit([("a", 0, la[:1], ea[:1])])
    state = json.loads(json.dumps(pp.state_dict()))
    again = ProfilePreprocessor.from_dict(state)
    slots = torch.zeros(len(ea), dtype=torch.long)
    assert torch.equal(again(la, ea, slots), pp(la, ea, slots))
    with pytest.raises(ValueError, match="unknown keys"):
        ProfilePreprocessor.from_dict({**state, "scale": 1})
    # adding a geometry keeps the others' statistics
    before = dict(pp.stats["siw"])
    pp.fit([("cld", 4, la * 3, ea)])
    assert pp.stats["siw"] == before and pp.geometries == {"siw": 0, "ild": 2, "cld": 4}


def test_running_stats_do_not_depend_on_batching():
    v = torch.randn(101, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    one, many = RunningStats(), RunningStats()
    one.update(v)
    for part in (v[:1], v[1:50], v[50:]):
        many.update(part)
    torch.testing.assert_close(many.mean, v.mean(0))
    torch.testing.assert_close(many.std, v.std(0, correction=0))
    torch.testing.assert_close(one.std, many.std)


def test_model_space_inputs_of_both_variants():
    x, energy = showers(batch=4)
    batch = {"showers": x.float(), "energy": energy.float(), "phi": torch.zeros(4), "theta": torch.ones(4),
             "geometry": torch.tensor([0, 2, 0, 2])}
    single = ShowerPreprocessor().fit([(x, energy)])
    space = ModelSpace(single)
    xs, cond = space.inputs(batch, "cpu")
    assert "profile" not in cond and torch.allclose(cond["energy"], energy.float() / 1e3)
    layer = ShowerPreprocessor(mode="layer").fit([(x, energy)])
    profile = ProfilePreprocessor().fit([("a", 0, x.sum((1, 2)), energy), ("b", 2, x.sum((1, 2)), energy)])
    space = ModelSpace(layer, profile)
    xf, cond = space.inputs(batch, "cpu")
    assert cond["profile"].shape == (4, 46) and xf.shape == x.shape
    torch.testing.assert_close(cond["profile"].double(), profile(x.sum((1, 2)), energy, batch["geometry"]),
                               rtol=1e-6, atol=1e-6)
    assert ModelSpace(single, profile).factorised  # fraction-of-E_inc cells, rescaled to the layer energies
    with pytest.raises(ValueError, match="needs the profile"):
        ModelSpace(layer)
    config = preset_config("tiny", variant="factorised", preprocessing=layer.state_dict(),
                           profile_preprocessing=profile.state_dict(), geometry_slots={"a": 0, "b": 2})
    assert ModelSpace.from_config(config).factorised
    with pytest.raises(ValueError, match="profile_preprocessing"):
        ModelSpace.from_config(preset_config("tiny", variant="factorised", preprocessing=layer.state_dict()))
    with pytest.raises(ValueError, match="another slot"):  # statistics and slots must agree
        preset_config("tiny", variant="factorised", preprocessing=layer.state_dict(),
                      profile_preprocessing=profile.state_dict(), geometry_slots={"a": 0, "b": 3})
    assert math.isclose(ModelSpace.from_config(config).profile.eps, profile.eps)


def test_threshold_floor_sits_at_a_fixed_fraction_of_the_readout_threshold():
    x, energy = showers()
    thr = torch.tensor([0.5, 0.5, 1e-3, 1e-3, 0.1, 0.1], dtype=torch.float64)  # MeV, per shower
    x = torch.where(x >= thr.reshape(-1, 1, 1, 1), x, torch.zeros_like(x))  # as read out
    pre = ShowerPreprocessor(mode="layer", floor=0.3).fit([{"showers": x, "energy": energy, "threshold": thr}])
    layers = x.sum(dim=(1, 2))
    y = pre.forward(x, energy, threshold=thr)
    # an empty cell sits at log(0.3 thr / E_layer): the same distance below a threshold-sized hit everywhere
    unit = layers[:, None, None, :]
    empty = (torch.log(0.3 * thr.reshape(-1, 1, 1, 1) / unit) - pre.mean) / pre.std
    at_threshold = (torch.log(1.3 * thr.reshape(-1, 1, 1, 1) / unit) - pre.mean) / pre.std
    zero = (x == 0) & (layers[:, None, None, :] > 0)
    torch.testing.assert_close(y[zero], empty.expand_as(y)[zero])
    gap = ((at_threshold - empty) * pre.std)[..., :40]  # layers 40-44 are empty: no unit
    torch.testing.assert_close(gap, torch.full_like(gap, math.log(1.3 / 0.3)))
    back = pre.inverse(y, energy, threshold=thr, layers=layers)
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="threshold"):
        pre.forward(x, energy)
    with pytest.raises(ValueError, match="floor"):
        ShowerPreprocessor(floor=0.0)
    state = pre.state_dict()
    assert ShowerPreprocessor.from_dict(state).floor == 0.3
    old = {k: v for k, v in state.items() if k != "floor"} | {"version": 2}  # written before the floor existed
    assert ShowerPreprocessor.from_dict(old).floor is None


def test_model_space_takes_each_rows_threshold_from_its_geometry():
    x, energy = showers(batch=4)
    thr = {0: 5e-4, 2: 0.1}
    slots = torch.tensor([0, 2, 0, 2])
    rows = torch.tensor([thr[int(s)] for s in slots], dtype=torch.float64)
    x = torch.where(x >= rows.reshape(-1, 1, 1, 1), x, torch.zeros_like(x))
    pre = ShowerPreprocessor(mode="layer", floor=0.3).fit([{"showers": x, "energy": energy, "threshold": rows}])
    profile = ProfilePreprocessor().fit([("a", 0, x.sum((1, 2)), energy), ("b", 2, x.sum((1, 2)), energy)])
    space = ModelSpace(pre, profile, thr)
    batch = {"showers": x.float(), "energy": energy.float(), "phi": torch.zeros(4), "theta": torch.ones(4),
             "geometry": slots}
    xs, cond = space.inputs(batch, "cpu")
    torch.testing.assert_close(xs.double(), pre.forward(x, energy, threshold=rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["layer_energy"].double(), x.sum((1, 2)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="thresholds"):
        ModelSpace(pre, profile)
