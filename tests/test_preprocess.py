"""ShowerPreprocessor: exact inverse, non-negative output, threshold cut, streamed fit, JSON state."""

import json
import math

import pytest
import torch

from calofm.models import CaloDiTConfig
from calofm.preprocess import ShowerPreprocessor


def showers(batch=6, seed=0, dtype=torch.float32):
    """Sparse log-normal MeV showers (about 60 % empty cells) and incident energies 1 GeV - 1 TeV in MeV."""
    g = torch.Generator().manual_seed(seed)
    energy = 10 ** (3 + 3 * torch.rand(batch, generator=g, dtype=torch.float64))  # MeV
    cells = torch.exp(torch.randn(batch, 9, 16, 45, generator=g, dtype=torch.float64) * 3 - 2)
    cells = cells * (energy / 1e3).reshape(-1, 1, 1, 1)
    cells[torch.rand(cells.shape, generator=g) < 0.6] = 0
    return cells.to(dtype), energy.to(dtype)


@pytest.mark.parametrize("mode", ["absolute", "fraction"])
def test_inverse_is_exact_above_threshold(mode):
    x, energy = showers()
    pre = ShowerPreprocessor(mode=mode, mean=-4.0, std=3.0)
    y = pre.forward(x, energy)
    assert y.shape == x.shape and torch.isfinite(y).all()
    threshold = 5e-4
    back = pre.inverse(y, energy, threshold=threshold)
    hit = x >= threshold * (1 + 1e-4)
    # y is float32: its rounding is relative in x + eps*u (u = 1 MeV or E_inc), the quantity the log sees
    scale = x + pre.eps * (energy.reshape(-1, 1, 1, 1) if mode == "fraction" else 1.0)
    assert ((back - x).abs() <= 1e-5 * scale)[hit].all()
    assert (back[x == 0] == 0).all()
    x64, e64 = showers(dtype=torch.float64)  # float64 in, float64 out: exact to double precision
    torch.testing.assert_close(pre.inverse(pre.forward(x64, e64), e64), x64, rtol=1e-12, atol=1e-15)


def test_output_is_non_negative_and_threshold_cut_per_sample():
    pre = ShowerPreprocessor(mode="absolute", mean=-5.0, std=2.0)
    y = torch.randn(3, 9, 16, 45) * 3  # arbitrary model-space values, many below the eps floor
    x = pre.inverse(y)
    assert (x >= 0).all() and (x == 0).any()  # below log(eps) -> clamped, never negative
    threshold = torch.tensor([0.0, 0.01, 1.0])  # MeV, one per sample
    cut = pre.inverse(y, threshold=threshold)
    for b in range(3):
        kept = x[b] >= threshold[b]
        assert torch.equal(cut[b][kept], x[b][kept]) and (cut[b][~kept] == 0).all()
    assert (cut[2] < 1.0).logical_and(cut[2] > 0).sum() == 0


def test_noise_cut_scales_with_eps_and_incident_energy():
    energy = torch.tensor([1e3, 1e5])  # MeV
    pre = ShowerPreprocessor(eps=1e-6, noise_cut=2.0)  # default mode: fraction of E_inc
    assert pre.mode == "fraction"
    cells = torch.tensor([1.5e-3, 2.5e-3, 0.15, 0.25])  # MeV; the cut is 2e-3 MeV at 1 GeV, 0.2 MeV at 100 GeV
    x = cells.expand(2, 4).clone()
    back = pre.inverse(pre.forward(x.double(), energy.double()), energy.double())
    assert back[0].nonzero().flatten().tolist() == [1, 2, 3] and back[1].nonzero().flatten().tolist() == [3]
    torch.testing.assert_close(back[back > 0], x.double()[back > 0])
    # the readout threshold still applies above the noise cut
    assert (pre.inverse(pre.forward(x, energy), energy, threshold=0.2)[0] > 0).tolist() == [False, False, False, True]
    uncut = ShowerPreprocessor(eps=1e-6).inverse(pre.forward(x.double(), energy.double()), energy.double())
    torch.testing.assert_close(uncut, x.double())


def test_fraction_mode_needs_energy():
    pre = ShowerPreprocessor(mode="fraction")
    with pytest.raises(ValueError, match="incident energy"):
        pre.forward(torch.zeros(1, 9, 16, 45))


def test_negative_energies_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        ShowerPreprocessor().forward(-torch.ones(1, 9, 16, 45))


@pytest.mark.parametrize("mode", ["absolute", "fraction"])
def test_streamed_fit_matches_full_data_and_standardises(mode):
    parts = [showers(batch=b, seed=s) for b, s in ((5, 1), (1, 2), (7, 3))]  # uneven batches
    pre = ShowerPreprocessor(mode=mode).fit({"showers": x, "energy": e} for x, e in parts)
    every = torch.cat([ShowerPreprocessor(mode=mode).forward(x.double(), e.double()).flatten() for x, e in parts])
    assert pre.count == every.numel()
    assert pre.mean == pytest.approx(every.mean().item(), rel=1e-9)
    assert pre.std == pytest.approx(every.std(correction=0).item(), rel=1e-9)
    y = torch.cat([pre.forward(x, e).flatten() for x, e in parts]).double()
    assert y.mean().item() == pytest.approx(0.0, abs=1e-5) and y.std().item() == pytest.approx(1.0, abs=1e-4)
    assert ShowerPreprocessor(mode=mode).fit(iter(parts)).mean == pytest.approx(pre.mean)  # (showers, energy) pairs


def test_fit_needs_data():
    with pytest.raises(ValueError, match="at least two"):
        ShowerPreprocessor().fit([])


def test_state_json_round_trip_and_lives_in_model_config(tmp_path):
    x, energy = showers()
    pre = ShowerPreprocessor(noise_cut=2.0).fit([(x, energy)])
    state = json.loads(json.dumps(pre.state_dict()))
    again = ShowerPreprocessor.from_dict(state)
    assert again.state_dict() == pre.state_dict()
    assert torch.equal(again.forward(x, energy), pre.forward(x, energy))
    config = CaloDiTConfig(hidden_size=48, num_attention_heads=4, preprocessing=pre.state_dict())
    config.save_pretrained(tmp_path)
    loaded = ShowerPreprocessor.from_dict(CaloDiTConfig.from_pretrained(tmp_path).preprocessing)
    assert loaded.state_dict() == pre.state_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        ShowerPreprocessor.from_dict({**state, "scale": 2})
    with pytest.raises(ValueError, match="version"):
        ShowerPreprocessor.from_dict({**state, "version": 99})
    old = {k: v for k, v in state.items() if k != "noise_cut"} | {"version": 1}  # before noise_cut existed
    assert ShowerPreprocessor.from_dict(old).noise_cut == 0.0


@pytest.mark.parametrize(
    "kwargs", [dict(mode="sqrt"), dict(eps=0.0), dict(std=0.0), dict(mean=math.nan), dict(noise_cut=-1.0)]
)
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        ShowerPreprocessor(**kwargs)


# -- mode "logit" (CaloDiffusion's preprocessing) ----------------------------------------------------------------


def physical_showers(batch=6, seed=0, dtype=torch.float32):
    """``showers`` with no cell above the incident energy (the logit transform represents up to maxdep x E_inc)."""
    x, energy = showers(batch, seed, dtype)
    return torch.minimum(x, energy.reshape(-1, 1, 1, 1)), energy


def test_logit_round_trip_state_and_refusals(tmp_path):
    x, energy = physical_showers()
    pre = ShowerPreprocessor(mode="logit", noise_cut=2.0).fit([(x, energy)])
    assert pre.maxdep == 2.0 and pre.eps == 1e-6  # the paper's MAXDEP (datasets 2, 3) and alpha
    y = pre.forward(x, energy)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert abs(y.double().mean().item()) < 1e-4 and abs(y.double().std().item() - 1) < 1e-3  # standardised
    # the forward map itself: logit(alpha + (1 - 2 alpha) x / (maxdep E_inc)), then the fitted standardisation
    v = 1e-6 + (1 - 2e-6) * x.double() / (2.0 * energy.double().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(pre.forward(x.double(), energy.double()), (torch.log(v / (1 - v)) - pre.mean) / pre.std)
    # float32 round trip: cells well above the empty-cell floor (alpha maxdep E_inc) come back to 1e-5 relative
    floor = pre.eps * pre.maxdep * energy.reshape(-1, 1, 1, 1)
    threshold = 5e-4
    back = pre.inverse(y, energy, threshold=threshold)
    hit = x >= torch.clamp_min(10 * floor, threshold * (1 + 1e-4))
    assert hit.sum() > 1000 and (((back - x).abs() <= 1e-5 * x)[hit]).all()
    above = x >= torch.clamp_min(2.01 * floor, threshold * (1 + 1e-4))  # above the readout threshold and noise cut
    assert (((back - x).abs() <= 1e-5 * (x + floor))[above]).all()
    below = (x < threshold) | (x < 1.99 * floor)
    assert (back >= 0).all() and (back[x == 0] == 0).all() and (back[below] == 0).all()
    x64, e64 = physical_showers(dtype=torch.float64)
    exact = ShowerPreprocessor(mode="logit", mean=pre.mean, std=pre.std)  # no noise cut: every cell comes back
    torch.testing.assert_close(exact.inverse(exact.forward(x64, e64), e64), x64, rtol=1e-9, atol=1e-12)
    # the noise cut removes cells below noise_cut x the floor; arbitrary model-space values stay finite, <= maxdep E
    cells = torch.tensor([[1.5, 2.5, 100.0]]) * 2e-6 * 1e4  # MeV at E_inc = 10 GeV: floor 0.02 MeV
    kept = pre.inverse(pre.forward(cells.double(), torch.tensor([1e4]).double()), torch.tensor([1e4]).double())
    assert (kept > 0).tolist() == [[False, True, True]]
    wild = pre.inverse(torch.randn(2, 9, 16, 45) * 50, torch.tensor([1e3, 1e5]))
    assert torch.isfinite(wild).all() and (wild <= 2 * torch.tensor([1e3, 1e5]).reshape(-1, 1, 1, 1) * 1.0001).all()
    # state: JSON round trip through a model config; maxdep is kept, other modes' states carry no maxdep
    state = json.loads(json.dumps(ShowerPreprocessor(mode="logit", maxdep=3.1).fit([(x, energy)]).state_dict()))
    assert state["maxdep"] == 3.1 and "maxdep" not in ShowerPreprocessor().state_dict()
    again = ShowerPreprocessor.from_dict(state)
    assert again.state_dict() == state and torch.equal(again.forward(x, energy), ShowerPreprocessor(
        mode="logit", maxdep=3.1).fit([(x, energy)]).forward(x, energy))
    config = CaloDiTConfig(hidden_size=48, num_attention_heads=4, preprocessing=state)
    config.save_pretrained(tmp_path)
    assert ShowerPreprocessor.from_dict(CaloDiTConfig.from_pretrained(tmp_path).preprocessing).state_dict() == state
    with pytest.raises(ValueError, match="unknown keys"):
        ShowerPreprocessor.from_dict({**state, "alpha": 1e-6})
    with pytest.raises(ValueError, match="maxdep"):
        pre.forward(x * 3, energy)  # a cell above maxdep x E_inc is refused (checked), not silently saturated
    with pytest.raises(ValueError, match="incident energy"):
        pre.forward(x)
    for bad in (dict(maxdep=0.0), dict(eps=0.5), dict(floor=0.5)):
        with pytest.raises(ValueError):
            ShowerPreprocessor(mode="logit", **bad)
    with pytest.raises(ValueError, match="maxdep"):
        ShowerPreprocessor(mode="fraction", maxdep=2.0)
