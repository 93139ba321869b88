"""The two energy-model candidates of benchmarks/energy_model.py, with their data and training loop.

Data: profiles (layer energies + conditions) of the default pretraining's simulated files. Models share one
interface, ``loss(y, cond, generator) -> (B,)`` and ``sample(cond, generator) -> (B, Z + 1)``, on
``ProfilePreprocessor``'s model space. ``Trainer`` is the pretraining loop's optimisation for one of them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import torch
from torch import nn

from calofm.diffusion import EDMPrecond, edm_loss, heun_sample
from calofm.ema import EMA
from calofm.models.energy import LayerEnergyNet
from calofm.models.layers import ZeroLinear
from calofm.preprocess import ProfilePreprocessor
from calofm.training.config import OptimConfig
from calofm.training.loop import lr_lambda, param_groups

GEOMETRIES = {"par04_siw": 0, "odd": 1, "ild": 2}  # the pretraining cards' one-hot slots
N_SLOTS = 8  # CaloDiTConfig.n_geometry_slots
N_LAYERS = 45
WIDTH = N_LAYERS + 1
STATS_SAMPLES = 2000  # DataConfig.stats_samples: showers per geometry for the profile statistics
# CaloDiTConfig's EDM constants (sigma_data = 1 on the standardised profile, P_mean = -0.5)
EDM = SimpleNamespace(sigma_data=1.0, sigma_min=0.002, sigma_max=80.0, rho=7.0, P_mean=-0.5, P_std=1.2)

# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class Profiles:
    """Showers reduced to what the energy model sees: layer energies and conditions, all rows of all geometries."""

    layers: torch.Tensor  # (N, Z) MeV float64
    energy: torch.Tensor  # (N,) MeV float64
    phi: torch.Tensor  # (N,) rad float32
    theta: torch.Tensor  # (N,) rad float32
    geometry: torch.Tensor  # (N,) slot, long

    def __len__(self) -> int:
        return len(self.energy)

    def cond(self, rows=slice(None)) -> dict[str, torch.Tensor]:
        """The energy model's conditions (energy GeV, phi, theta rad, geometry slot) of ``rows``."""
        return {"energy": (self.energy[rows] / 1e3).float(), "phi": self.phi[rows], "theta": self.theta[rows],
                "geometry": self.geometry[rows]}

    def select(self, rows) -> Profiles:
        return Profiles(*(getattr(self, f)[rows] for f in ("layers", "energy", "phi", "theta", "geometry")))

    @staticmethod
    def cat(parts: list[Profiles]) -> Profiles:
        return Profiles(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("layers", "energy", "phi", "theta", "geometry")))


def read_profiles(path: str | Path, slot: int, chunk: int = 1000) -> Profiles:
    """Layer energies (showers summed over r and phi, in float64 as ``fit_profile``) and conditions of a file."""
    with h5py.File(path, "r") as f:
        n = len(f["incident_energy"])
        layers = torch.cat([torch.as_tensor(f["showers"][i:i + chunk]).double().sum(dim=(1, 2))
                            for i in range(0, n, chunk)])
        energy = torch.as_tensor(f["incident_energy"][:]).double()
        phi = torch.as_tensor(f["incident_phi"][:]).float()
        theta = torch.as_tensor(f["incident_theta"][:]).float()
    return Profiles(layers, energy, phi, theta, torch.full((n,), slot, dtype=torch.long))


def fit_profiles(train: dict[str, Profiles], samples: int = STATS_SAMPLES) -> ProfilePreprocessor:
    """Per-geometry statistics on the first ``samples`` showers of each geometry (``fit_profile``'s rows and
    settings: eps 1e-6, noise_cut 1, the PreprocessConfig defaults of the factorised variant)."""
    return ProfilePreprocessor(eps=1e-6, noise_cut=1.0).fit(
        (name, GEOMETRIES.get(name, int(p.geometry[0])), p.layers[:samples], p.energy[:samples])
        for name, p in train.items())


LOW = (1.0, 10.0)  # GeV: the low-energy held-out samples (1 % of the flat 1-1000 GeV training spectrum)


def simulated(name: str, n: int, seed: int, cache: str | Path, energy: tuple[float, float] | None = None
              ) -> Profiles:
    """Profiles of a cached simulation (simulated on first use) of geometry ``name``, labelled with its slot."""
    from calofm.sim.cache import simulated_file

    path = simulated_file(name, n, seed=seed, cache=cache, energy=energy, progress=False)
    return read_profiles(path, GEOMETRIES[name])


def load_data(cache: str | Path, n_train: int = 6000, n_heldout: int = 2000, n_low: int = 0,
              heldout_seed: int = 2024, geometries=tuple(GEOMETRIES)) -> tuple[dict[str, Profiles], dict]:
    """(training profiles per geometry, held-out sets {label: (geometry, energy range or None, profiles)}).

    The training files are the default pretraining's (seed 1); the held-out ones use ``heldout_seed``. With
    ``n_low``, geometries whose spectrum reaches below 10 GeV also get a held-out set of ``n_low`` showers at
    1-10 GeV (label "<geometry>@1-10"), where a random 2000 holds only ~20 showers."""
    from calofm.geometry import load_geometry

    train, held = {}, {}
    for name in geometries:
        train[name] = simulated(name, n_train, 1, cache)
        held[name] = (name, None, simulated(name, n_heldout, heldout_seed, cache))
        if n_low and load_geometry(name).card.energy[0] < LOW[1]:
            held[f"{name}@1-10"] = (name, LOW, simulated(name, n_low, heldout_seed, cache, LOW))
    return train, held


# ----------------------------------------------------------------------------------------------
# Models: loss(y, cond, generator) -> (B,), sample(cond, generator) -> (B, Z + 1)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def init_like_calodit(net: nn.Module) -> nn.Module:
    """CaloDiTPreTrainedModel._init_weights on a bare network: adaLN-Zero and final layers zero, other Linears
    Xavier-uniform with zero bias, embeddings N(0, 0.02), exactly as ``energy_net`` starts inside CaloDiT."""
    for m in net.modules():
        if isinstance(m, ZeroLinear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    return net


class DiffusionEnergyModel(nn.Module):
    """Model A: today's ``LayerEnergyNet`` under EDM, as in ``DiffusionObjective`` and ``calofm.generate``."""

    name = "diffusion"

    def __init__(self, hidden: int = 64, depth: int = 3, heads: int = 4, frequency_embedding_size: int = 128,
                 sample_steps: int = 10):
        super().__init__()
        # the small preset's frequency_embedding_size (128); CaloDiTModel passes the config's own
        self.net = init_like_calodit(LayerEnergyNet(N_LAYERS, hidden, depth, heads,
                                                    frequency_embedding_size=frequency_embedding_size,
                                                    n_slots=N_SLOTS))
        self.precond = EDMPrecond(self.net, EDM)
        self.sample_steps = sample_steps

    def loss(self, y: torch.Tensor, cond: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return edm_loss(self.precond, y, cond, generator)

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(len(cond["energy"]), WIDTH, generator=generator, dtype=torch.float64)
        return heun_sample(self.precond, noise, cond, num_steps=self.sample_steps)


def flow_context(cond: dict) -> torch.Tensor:
    """[log E_inc/GeV, sin phi, cos phi, theta, one-hot slot] (B, 4 + N_SLOTS), the flow's condition vector."""
    e, phi, theta = cond["energy"].float(), cond["phi"].float(), cond["theta"].float()
    onehot = nn.functional.one_hot(cond["geometry"].long(), N_SLOTS).float()
    return torch.cat([torch.stack([e.log(), phi.sin(), phi.cos(), theta], dim=1), onehot], dim=1)


class FlowEnergyModel(nn.Module):
    """Model B: a zuko conditional flow on the same (B, Z + 1) vector, trained by maximum likelihood.

    ``kind``: "nsf" (monotonic rational-quadratic splines as zuko's NSF, on [-bound, bound] with the identity
    outside: 10, not zuko's 5, since 0.5 % of the standardised profile lies beyond 5, e.g. a rare empty layer in
    the middle of a shower at -30) or "maf" (affine). ``passes`` None is fully autoregressive (45 + 1
    sequential passes per transform when sampling), 2 a coupling flow (one pass).

    Empty layers put point masses in the profile (log(0 + eps) exactly; 95 % of showers in the first Si-W layer,
    always in ILD's last). A flow's likelihood diverges on a point mass, so in training those entries get
    Gaussian noise of ``dequantise`` in log(share) units: ``ProfilePreprocessor.inverse`` maps every share
    below noise_cut * eps = eps (log offsets below ln 2 = 6.9 sigma) back to an empty layer, so the noise does
    not change what the samples invert to.
    """

    name = "flow"

    def __init__(self, profile: ProfilePreprocessor, kind: str = "nsf", transforms: int = 3,
                 hidden: tuple[int, ...] = (80, 80), bins: int = 8, bound: float = 10.0, passes: int | None = None,
                 dequantise: float = 0.1):
        super().__init__()
        import zuko

        kw = dict(transforms=transforms, hidden_features=tuple(hidden), passes=passes)
        if kind == "nsf":
            from functools import partial

            from zuko.transforms import MonotonicRQSTransform

            self.flow = zuko.flows.MAF(WIDTH, 4 + N_SLOTS, univariate=partial(MonotonicRQSTransform, bound=bound),
                                       shapes=[(bins,), (bins,), (bins - 1,)], **kw)
        elif kind == "maf":
            self.flow = zuko.flows.MAF(WIDTH, 4 + N_SLOTS, **kw)
        else:
            raise ValueError(f"flow kind must be 'nsf' or 'maf', not {kind!r}")
        self.kind, self.dequantise = kind, float(dequantise)
        # the model-space value of an empty layer and 1 / std per slot, for the dequantisation noise
        empty = torch.full((N_SLOTS, WIDTH), math.inf)  # slots without statistics: never dequantised
        inv_std = torch.zeros(N_SLOTS, WIDTH)
        for e in profile.stats.values():
            mean, std = torch.tensor(e["mean"]), torch.tensor(e["std"])
            empty[e["slot"], 1:] = ((math.log(profile.eps) - mean) / std)[1:]  # the total is never a point mass
            inv_std[e["slot"]] = 1 / std
        self.register_buffer("empty", empty, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def loss(self, y: torch.Tensor, cond: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative log-likelihood per dimension (B,)."""
        y = y.float()
        if self.training and self.dequantise > 0:
            slots = cond["geometry"].long()
            at_empty = (y - self.empty[slots]).abs() < 1e-3 * self.inv_std[slots]  # 1e-3 in log(share)
            noise = torch.randn(y.shape, generator=generator) * self.dequantise * self.inv_std[slots]
            y = torch.where(at_empty, y + noise, y)
        return -self.flow(flow_context(cond)).log_prob(y) / WIDTH

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.flow(flow_context(cond))
        z = torch.randn(len(cond["energy"]), WIDTH, generator=generator)  # the base is N(0, I) (MAF's DiagNormal)
        return dist.transform.inv(z)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class Trainer:
    """The pretraining loop's optimisation for one energy model: AdamW with weight decay on matrices,
    warm-up + cosine (``calofm.training.loop.lr_lambda``), gradient clipping, EMA; batches drawn uniformly
    from all geometries (equal sizes, so equal shares as the equal-weight sources of the default run)."""

    def __init__(self, model: nn.Module, y: torch.Tensor, data: Profiles, steps: int, batch: int = 32,
                 seed: int = 0, ema_decay: float = 0.995, optim: OptimConfig | None = None):
        o = optim or OptimConfig()
        self.model, self.y, self.data, self.steps, self.batch = model, y, data, steps, batch
        self.opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(SimpleNamespace(optim=o, steps=steps)))
        self.clip = o.grad_clip
        self.ema = EMA(model, ema_decay)
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.seconds, self.losses = 0, 0.0, []

    def run(self, n: int | None = None) -> Trainer:
        """``n`` more steps (default: to the end); the time spent is added to ``seconds``."""
        n = self.steps - self.step if n is None else min(n, self.steps - self.step)
        self.model.train()
        t0 = time.perf_counter()
        for _ in range(n):
            rows = torch.randint(len(self.y), (self.batch,), generator=self.gen)
            loss = self.model.loss(self.y[rows], self.data.cond(rows), self.gen).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.sched.step()
            self.ema.update(self.model)
            self.step += 1
            self.losses.append(loss.item())
        self.seconds += time.perf_counter() - t0
        return self

    def ema_model(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model.eval()


def step_costs(builders: dict, y: torch.Tensor, data: Profiles, repeats: int = 3, steps: int = 40) -> dict:
    """Seconds per training step of each model, best of ``repeats`` interleaved rounds (warm-up steps first),
    so a machine shared with other jobs slows every model alike."""
    trainers = {k: Trainer(b(), y, data, steps=10**9, seed=123) for k, b in builders.items()}
    for t in trainers.values():
        t.run(5)
    best = {k: math.inf for k in trainers}
    for _ in range(repeats):
        for k, t in trainers.items():
            before = t.seconds
            t.run(steps)
            best[k] = min(best[k], (t.seconds - before) / steps)
    return best
