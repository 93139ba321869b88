"""EDM (Karras et al. 2022, arXiv:2206.00364): preconditioning, training loss and ODE samplers.

The network is the raw F of ``calofm.models`` (or any module with its signature); ``EDMPrecond``
turns it into the denoiser D(x; sigma). Loss and samplers are pure functions of a denoiser, so the
samplers also run on analytic denoisers (tests). Conditions travel as a dict ``cond`` of keyword
arguments (energy GeV, phi, theta rad, geometry slot; all (B,)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

# EDM defaults, used when a denoiser does not carry its own constants (e.g. an analytic test denoiser).
EDM_DEFAULTS = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, P_mean=-1.2, P_std=1.2)

Denoiser = Callable[..., torch.Tensor]  # D(x, sigma (B,), **cond) -> same shape as x
Callback = Callable[[int, int, torch.Tensor], None]  # (step index, number of steps, x after the step)


def edm_constant(obj: Any, name: str) -> float:
    """``name`` from the denoiser, else from its ``config``, else the EDM default."""
    for source in (obj, getattr(obj, "config", None)):
        if source is not None and getattr(source, name, None) is not None:
            return float(getattr(source, name))
    return EDM_DEFAULTS[name]


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar or (B,)) -> (B, 1, ..., 1), broadcastable against x (B, ...), in x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape; c_noise flattened)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma**2).sqrt()
    c_noise = sigma.log().flatten() / 4  # (B,)
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise = ln(sigma)/4, cond) (EDM Table 1).

    EDM's constants come from ``config`` if given (e.g. the CaloDiT config for its ``energy_net``), else
    from the network or its ``config``, else ``EDM_DEFAULTS``. Works in the dtype of x (float64 in the
    samplers); F runs in its own parameter dtype, or under autocast, and its output is cast back.
    """

    def __init__(self, net: nn.Module, config: Any = None):
        super().__init__()
        self.net = net
        for name in EDM_DEFAULTS:
            setattr(self, name, edm_constant(config if config is not None else net, name))

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return edm_scalings(sigma, self.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = _as_batch(sigma, x)  # (B, 1, ..., 1)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        net_dtype = next(self.net.parameters()).dtype
        F_x = self.net((c_in * x).to(net_dtype), c_noise.float(), **cond)
        return c_skip * x + c_out * F_x.to(x.dtype)


def consistency_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float) -> tuple[torch.Tensor, ...]:
    """Consistency models' boundary parameterisation (Song et al. 2023, arXiv:2303.01469, Appendix C):
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
    so f(x, sigma_min) = x exactly; c_in and c_noise as EDM's (a student starts from its teacher's weights)."""
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma**2).sqrt()
    return c_skip, c_out, c_in, sigma.log().flatten() / 4


class ConsistencyPrecond(EDMPrecond):
    """f(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond) with the boundary condition f(x; sigma_min) = x:
    the consistency function of a distilled student, which maps any point of an ODE path to its end."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return consistency_scalings(sigma, self.sigma_data, self.sigma_min)


def precond_for(net: nn.Module, config: Any = None) -> EDMPrecond:
    """The denoiser of a network: ``ConsistencyPrecond`` for a distilled student (its config lists
    ``consistency_sigmas``), else ``EDMPrecond``."""
    student = bool(getattr(config if config is not None else getattr(net, "config", None), "consistency_sigmas", None))
    return (ConsistencyPrecond if student else EDMPrecond)(net, config)


def draw_sigma_noise(
    x: torch.Tensor, generator: torch.Generator | None = None, P_mean: float = -1.2, P_std: float = 1.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise for batch x: ln sigma ~ N(P_mean, P_std^2) (B,) first, then noise ~ N(0, 1) like x.

    Drawn on the generator's device and moved to x's, so a CPU generator reproduces on any device.
    """
    device = generator.device if generator is not None else x.device
    rnd = torch.randn(x.shape[0], generator=generator, device=device, dtype=torch.float32)
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    sigma = (rnd * P_std + P_mean).exp()
    return sigma.to(x.device), noise.to(device=x.device, dtype=x.dtype)


def edm_loss(
    precond: Denoiser,
    x: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample EDM loss (B,): lambda(sigma) * mean over cells of (D(x + sigma n; sigma) - x)^2.

    lambda = (sigma^2 + sd^2) / (sigma sd)^2. Pass ``sigma`` (B,) and ``noise`` (like x) to fix the
    draw exactly (e.g. identical across process counts); otherwise they come from ``generator``.
    """
    if sigma is None or noise is None:
        s, n = draw_sigma_noise(x, generator, edm_constant(precond, "P_mean"), edm_constant(precond, "P_std"))
        sigma = s if sigma is None else sigma
        noise = n if noise is None else noise
    sd = edm_constant(precond, "sigma_data")
    sigma = sigma.to(device=x.device, dtype=x.dtype).reshape(-1)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # (B,)
    denoised = precond(x + noise * _as_batch(sigma, x), sigma, **cond)
    return weight * (denoised - x).square().flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """EDM time steps (n + 1,) float64: sigma_max ... sigma_min on a rho-warped grid (EDM Eq. 5), then 0."""
    if n < 1:
        raise ValueError(f"need at least 1 sampling step, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    ramp = i / (n - 1) if n > 1 else i  # n = 1: a single step from sigma_max
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def _steps(denoiser: Denoiser, sigmas: torch.Tensor | list[float] | None, num_steps: int) -> list[float]:
    """The time steps as Python floats (float64), so a traced or exported sampler holds them as constants."""
    if sigmas is None:
        consts = [edm_constant(denoiser, k) for k in ("sigma_min", "sigma_max", "rho")]
        return karras_sigmas(num_steps, *consts).tolist()
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.double().tolist()
    sigmas = [float(v) for v in sigmas] if isinstance(sigmas, list | tuple) else sigmas
    if not isinstance(sigmas, list) or len(sigmas) < 2 or sigmas[-1] != 0 or any(
            b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be a 1-D decreasing schedule ending in 0 (see karras_sigmas)")
    return sigmas


def _denoise(denoiser: Denoiser, x: torch.Tensor, t: float, cond: Mapping[str, Any]) -> torch.Tensor:
    sigma = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    return denoiser(x, sigma, **cond).to(torch.float64)


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    sigmas: torch.Tensor | None = None,
    num_steps: int = 32,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM Algorithm 2 (Heun, 2nd order): N steps cost 2N - 1 denoiser calls; s_churn = 0 is the ODE.

    ``noise`` ~ N(0, I) of the output shape; the state is float64, the result has noise's dtype.
    """
    cond = cond or {}
    t_steps = _steps(denoiser, sigmas, num_steps)
    n = len(t_steps) - 1
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Algorithm 2 lines 4-6: optionally raise the noise level to t_hat (stochastic churn)
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, device=generator.device if generator else x_cur.device)
            x_hat = x_cur + (t_hat**2 - t_cur**2) ** 0.5 * s_noise * eps.to(x_cur)
        # lines 7-8: Euler step
        d_cur = (x_hat - _denoise(denoiser, x_hat, t_hat, cond)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # lines 9-11: second-order correction, except for the last step into sigma = 0
        if i < n - 1:
            d_prime = (x_next - _denoise(denoiser, x_next, t_next, cond)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, n, x_next)
    return x_next.to(noise.dtype)


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    sigmas: torch.Tensor | None = None,
    num_steps: int = 32,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """First-order Euler on the EDM probability-flow ODE: N steps, N denoiser calls (a baseline for Heun)."""
    cond = cond or {}
    t_steps = _steps(denoiser, sigmas, num_steps)
    n = len(t_steps) - 1
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x_next - _denoise(denoiser, x_next, t_cur, cond)) / t_cur
        x_next = x_next + (t_next - t_cur) * d_cur
        if callback is not None:
            callback(i, n, x_next)
    return x_next.to(noise.dtype)


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    sigmas: torch.Tensor | None = None,
    num_steps: int = 8,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) on the EDM ODE: N steps, N denoiser calls.

    With x_sigma = x_0 + sigma n (EDM's alpha = 1) and lambda = -ln sigma, one step from sigma_i to sigma_{i+1}
    (h = ln(sigma_i / sigma_{i+1})) is exact for a denoised estimate D held fixed over the step:
    x <- (sigma_{i+1} / sigma_i) x + (1 - sigma_{i+1} / sigma_i) D. The multistep correction extrapolates D
    linearly in lambda from the previous step's estimate, D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with
    r = h_{i-1} / h_i, so the method is second order at the cost of Euler. The first step (no previous
    estimate) and the last one (into sigma = 0, where the extrapolation is undefined) are first order.
    """
    cond = cond or {}
    t_steps = _steps(denoiser, sigmas, num_steps)
    n = len(t_steps) - 1
    x = noise.to(torch.float64) * t_steps[0]
    d_prev, h_prev = None, None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = _denoise(denoiser, x, t_cur, cond)
        if t_next == 0:
            x = d_cur  # sigma -> 0: x becomes the denoised estimate
        else:
            h = math.log(t_cur / t_next)
            d = d_cur
            if d_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * d_cur - (1 / (2 * r)) * d_prev
            x = (t_next / t_cur) * x + (1 - t_next / t_cur) * d
            h_prev = h
        d_prev = d_cur
        if callback is not None:
            callback(i, n, x)
    return x.to(noise.dtype)


@torch.no_grad()
def consistency_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    sigmas: list[float] | torch.Tensor = (80.0,),
    *,
    sigma_min: float = 0.002,
    generator: torch.Generator | Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x = f(sigma_0 n, sigma_0), then for each
    further sigma_k: x = f(x + sqrt(sigma_k^2 - sigma_min^2) z, sigma_k) with fresh z ~ N(0, I). One network
    evaluation per entry of ``sigmas`` (decreasing, the first is sigma_max); ``denoiser`` is a consistency
    function (``ConsistencyPrecond``). The fresh noise comes from ``generator``: a torch.Generator (on its
    device), a function x -> N(0, I) draw like x (e.g. noise given to an exported graph), or ``randn_like``."""
    cond = cond or {}
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= sigma_min:
        raise ValueError(f"consistency sigmas must be decreasing and above sigma_min={sigma_min}, got {sigmas}")
    x = noise.to(torch.float64) * sigmas[0]
    for k, s in enumerate(sigmas):
        if k:
            if isinstance(generator, torch.Generator):
                z = torch.randn(x.shape, generator=generator, device=generator.device)
            else:
                z = generator(x) if generator is not None else torch.randn_like(x)
            x = x + (s**2 - sigma_min**2) ** 0.5 * z.to(x)
        x = _denoise(denoiser, x, s, cond)
        if callback is not None:
            callback(k, len(sigmas), x)
    return x.to(noise.dtype)


# ----------------------------------------------------------------------------------------------
# Consistency distillation (Song et al. 2023): the grid, the teacher's step and the loss
# ----------------------------------------------------------------------------------------------

MAX_GRID = 10_000


def consistency_grid(n: int, config) -> torch.Tensor:
    """EDM's N noise levels, ascending: sigma_min = t_1 < ... < t_N = sigma_max (float64)."""
    if not 2 <= n <= MAX_GRID:
        raise ValueError(f"the distillation grid needs 2 to {MAX_GRID} points, got {n}")
    return karras_sigmas(n - 1, config.sigma_min, config.sigma_max, config.rho)[:-1].flip(0)


def heun_step(teacher, x: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, cond: dict) -> torch.Tensor:
    """One step of EDM's Heun solver with the teacher's denoiser from t_hi down to t_lo > 0 (per row)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    hi, lo = t_hi.reshape(shape), t_lo.reshape(shape)
    d_hi = (x - teacher(x, t_hi, **cond)) / hi
    x_euler = x + (lo - hi) * d_hi
    d_lo = (x_euler - teacher(x_euler, t_lo, **cond)) / lo
    return x + (lo - hi) * 0.5 * (d_hi + d_lo)


def consistency_loss(student, target, teacher, x: torch.Tensor, cond: dict, z: torch.Tensor, u: torch.Tensor,
                     grid: torch.Tensor) -> torch.Tensor:
    """Per-sample consistency-distillation loss (B,): ``u`` (B,) uniform in [0, 1) picks the grid step
    n (t_{n+1} -> t_n), ``z`` ~ N(0, I) like x makes x_{n+1} = x + t_{n+1} z."""
    grid = grid.to(device=x.device, dtype=x.dtype)
    n = (u * (len(grid) - 1)).long().clamp(max=len(grid) - 2)  # 0 .. N-2
    t_hi, t_lo = grid[n + 1], grid[n]
    x_hi = x + t_hi.reshape(-1, *([1] * (x.ndim - 1))) * z
    with torch.no_grad():
        x_lo = heun_step(teacher, x_hi, t_hi, t_lo, cond)
        goal = target(x_lo, t_lo, **cond)
    return (student(x_hi, t_hi, **cond) - goal).square().flatten(1).mean(dim=1)
