"""CaloFlow: two conditional normalizing flows, a MAF teacher and an IAF student distilled from it (Krause & Shih,
arXiv:2106.05285; CaloFlow II, arXiv:2110.11377; inductive CaloFlow, arXiv:2210.14245 / 2305.11934).

The papers' model (nflows, MADE-RQS blocks: masked autoregressive rational-quadratic splines with linear tails at
+-14, 8 bins):

- Flow I: p(layer energies | E_inc) in unit space: u_0 = E_tot / (k E_inc), u_i = E_{i-1} / sum_{j>=i-1} E_j (the
  share of the remaining energy), clipped to [0, 1], logit(alpha + (1 - 2 alpha) u) with alpha = 1e-6; 6 blocks,
  MADE hidden 64 (dataset 1);
- Flow II: p(voxels | layer energies, E_inc): every layer divided by its energy, uniform noise added (dequantising
  the empty cells), the same logit; conditioned on log10 E_inc and log10 E_i; 8 blocks (MADE hidden 378 for
  photons). For 6480 voxels one MAF is too large, so iCaloFlow models one layer at a time: a flow for layer 0 and
  one shared flow p(layer n | layer n-1, E_n, E_{n-1}, E_inc, one-hot n) applied 44 times, trained on random
  pairs of consecutive layers;
- generation: Flow I, then Flow II; the logit inverted, each layer renormalised to its sampled energy, a cut;
- CaloFlow II: the MAF teacher samples with D sequential MADE passes per block; an IAF student (one pass per
  block) is trained by probability density distillation, beta MSE_x + (1 - beta) MSE_z with beta = 0.5: MSE_x
  between the data and the student's decoding of the teacher's encoding of it, MSE_z between a noise draw and the
  teacher's encoding of the student's sample of it; optionally every intermediate state matched ("fully guided").

Here, on calofm's 9 x 16 x 45 mesh, scaled down for CPU by config only (defaults below, the papers' in comments):

- one model family, two stages: ``stage: teacher`` (both flows as MAFs, negative log-likelihood per dimension) and
  ``stage: student`` with ``distill_from`` (both flows as IAFs trained by the distillation losses against the frozen,
  unregistered teacher; Flow I is distilled too, so the student samples with one pass per block throughout);
- the training loop hands ``x`` in model space (``preprocessing_defaults``: log(cell / E_inc + eps), standardised);
  ``losses`` inverts it to cell energies in units of E_inc and builds the flows' inputs from those; ``generate``
  builds the cells in the same units and maps them forward again for the shared sampler (a cell generated as 0
  maps to the log floor, which the inverse and its noise cut return as exactly 0);
- dequantisation: uniform noise in [0, ``noise_level``) (units of E_inc, below the preprocessing's noise cut) on
  every cell before the layer energies are computed, as the paper adds noise before its preprocessing; the
  uniforms are Phi(noise) of the step's normal draws. Generated cells below ``noise_level`` (or the noise cut) -> 0;
- Flow II is iCaloFlow's shared layer flow for all 45 layers (layer 0 sees an empty previous layer, its one-hot
  tells it apart), conditioned on the shared ``condition_features`` (energy, angles, geometry), the layer one-hot,
  log10 of this and the previous layer's energy (units of E_inc, / 3) and the previous layer's logit shower (/ tail
  bound). One flow over 144 cells instead of 45 per-layer flows: 45 x fewer parameters (1.9 M for the default
  instead of ~80 M), and every step trains it. Each step trains it on ``layers_per_step`` layers per shower (an
  evenly spaced set at a random offset from ``noise["u"]``), iCaloFlow's random layer pairs: the spline arithmetic
  on B x layers x 144 values dominates the step time (45 layers at batch 32: ~4x the time of 9);
- at sampling the previous-layer context is the flow's own logit output for that layer (the training context is
  the dequantised data layer, which is what the flow models), not the cut shower with fresh noise;
- zuko's MADE blocks (PyTorch's default initialisation), feature order alternating ascending / descending instead of
  random permutations; losses per dimension (the loop clips the gradient norm of their sum);
- the student starts from the teacher's weights (``student_init: teacher``, needs equal widths: block k of the IAF
  reads the teacher's spline parameters from its input instead of its output), or fresh (``random``; the paper's
  student is fresh and wider). ``distill_state_weight`` > 0 adds the intermediate-state MSEs ("fully guided"; the
  MADE-output matching is not implemented). The z-passes' latents are the step's normals too (the ones that also
  dequantise, from cells no row's context sees: the losses are each unbiased, only their draws are shared);
- the teacher samples with zuko's inverse pruned to what each sequential pass needs (``invert_block``: the same
  passes and values, ~3-6x faster than full passes; ``network_evaluations`` counts the passes).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from calofm.models.caloflow_nets import ARFlow, from_unit_space, inverse_logit, logit, normal_cdf, to_unit_space
from calofm.models.shower import (
    COND_FEATURES,
    BaselineModel,
    ShowerModelConfig,
    check_ints,
    condition_features,
    register_family,
)
from calofm.preprocess import ShowerPreprocessor

STAGES = ("teacher", "student")
STUDENT_INIT = ("teacher", "random")
# settings a student must share with its teacher (the flows' inputs and the block structure)
_SHARED = ("mesh_shape", "n_geometry_slots", "total_scale", "alpha", "noise_level", "tail_bound", "bins",
           "flow1_transforms", "flow2_transforms")


class CaloFlowConfig(ShowerModelConfig):
    """Stage, the unit-space and logit settings, and the two flows' sizes."""

    model_type = "caloflow"
    preprocessing_defaults = {"mode": "fraction", "noise_cut": 2.0}

    stage: str = "teacher"  # "teacher": MAFs trained by likelihood; "student": IAFs distilled from distill_from
    distill_from: str | None = None  # the teacher's model folder (student stage only)
    total_scale: float = 1.0  # k of u_0 = E_tot / (k E_inc) (paper: 2.42 on its data; a shower deposits <= E_inc)
    alpha: float = 1e-6  # logit(alpha + (1 - 2 alpha) u) (paper)
    noise_level: float = 1e-6  # dequantisation noise and generation cut, units of E_inc
    tail_bound: float = 14.0  # splines on [-14, 14], identity outside (paper)
    bins: int = 8  # spline bins (paper)
    flow1_transforms: int = 6  # Flow I MADE-RQS blocks (paper: 6)
    flow1_hidden: tuple[int, ...] = (64,)  # Flow I MADE hidden layers (paper: one of 64)
    flow1_passes: int | None = None  # inverse passes per block: None = fully autoregressive (45); 2 = coupling
    flow2_transforms: int = 4  # Flow II blocks (paper: 8)
    flow2_hidden: tuple[int, ...] = (128,)  # Flow II MADE hidden layers (CaloFlow: one of 378; iCaloFlow: 256)
    flow2_passes: int | None = None  # None = fully autoregressive (144 cells)
    layers_per_step: int = 9  # Flow II layers trained per shower and step (45: all)
    distill_beta: float = 0.5  # beta MSE_x + (1 - beta) MSE_z (paper: 0.5)
    distill_state_weight: float = 0.0  # weight of the intermediate-state MSEs ("fully guided"; 0: off)
    student_init: str = "teacher"  # the student's first weights: the teacher's, or fresh ("random")

    def _normalise(self) -> None:
        self.flow1_hidden, self.flow2_hidden = tuple(self.flow1_hidden), tuple(self.flow2_hidden)

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        if self.stage not in STAGES:
            raise ValueError(f"{name}.stage={self.stage!r}: expected one of {STAGES}")
        if self.stage == "teacher" and self.distill_from is not None:
            raise ValueError(f"{name}: distill_from applies to stage 'student' only")
        if self.stage == "student" and not (isinstance(self.distill_from, str) and self.distill_from):
            raise ValueError(f"{name}: stage 'student' needs distill_from (the teacher's model folder)")
        if self.student_init not in STUDENT_INIT:
            raise ValueError(f"{name}.student_init={self.student_init!r}: expected one of {STUDENT_INIT}")
        for field in ("total_scale", "noise_level", "tail_bound"):
            if not 0 < getattr(self, field) < math.inf:
                raise ValueError(f"{name}.{field}={getattr(self, field)!r}: expected a finite value > 0")
        if not 0 < self.alpha < 0.01:
            raise ValueError(f"{name}.alpha={self.alpha!r}: expected a value in (0, 0.01)")
        if self.tail_bound <= -math.log(self.alpha):
            raise ValueError(f"{name}.tail_bound={self.tail_bound}: must exceed the logit range -log(alpha)")
        check_ints(name, "bins", [self.bins], low=2)
        for field in ("flow1_transforms", "flow2_transforms", "layers_per_step"):
            check_ints(name, field, [getattr(self, field)])
        for field in ("flow1_hidden", "flow2_hidden"):
            if not getattr(self, field):
                raise ValueError(f"{name}.{field}: needs at least one hidden layer")
            check_ints(name, field, getattr(self, field))
        for field in ("flow1_passes", "flow2_passes"):
            if getattr(self, field) is not None:
                check_ints(name, field, [getattr(self, field)])
        if self.mesh_shape[0] * self.mesh_shape[1] < 2 or self.mesh_shape[2] < 2:
            raise ValueError(f"{name}.mesh_shape={self.mesh_shape}: flows need >= 2 layers and >= 2 cells per layer")
        if self.layers_per_step > self.mesh_shape[2]:
            raise ValueError(f"{name}.layers_per_step={self.layers_per_step}: the mesh has {self.mesh_shape[2]} layers")
        if not 0 <= self.distill_beta <= 1:
            raise ValueError(f"{name}.distill_beta={self.distill_beta!r}: expected a value in [0, 1]")
        if not 0 <= self.distill_state_weight < math.inf:
            raise ValueError(f"{name}.distill_state_weight={self.distill_state_weight!r}: expected a value >= 0")


class CaloFlowModel(BaselineModel):
    """Flow I (layer energies) and Flow II (one layer's cells), MAFs (teacher) or IAFs (student)."""

    config_class = CaloFlowConfig
    family = "caloflow"
    title = "CaloFlow"  # name in the literature (model cards)
    summary = ("two conditional normalising flows (layer energies; each layer's normalised cells) with masked "
               "autoregressive spline transforms: a MAF teacher or its IAF student (Krause & Shih 2021)")
    default_steps = 1
    base_model_prefix = "caloflow"
    _teacher = None  # the frozen teacher of a student in training (init_training): never registered or saved

    def __init__(self, config: CaloFlowConfig):
        super().__init__(config)
        r, p, z = config.mesh_shape
        n_cond = COND_FEATURES + config.n_geometry_slots
        spline = dict(bins=config.bins, bound=config.tail_bound)
        self.flow1 = ARFlow(z, n_cond, config.flow1_transforms, config.flow1_hidden, passes=config.flow1_passes,
                            **spline)
        # context: conditions, layer one-hot, log energy of this and the previous layer, previous layer's shower
        self.flow2 = ARFlow(r * p, n_cond + z + 2 + r * p, config.flow2_transforms, config.flow2_hidden,
                            passes=config.flow2_passes, **spline)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default initialisation (zuko's and nflows'); transformers would draw N(0, 0.02)."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight.shape[1])
            init.uniform_(module.bias, -bound, bound)

    # -- spaces -------------------------------------------------------------------------------
    def preprocessor(self) -> ShowerPreprocessor:
        """The model space's transform (``config.preprocessing``; the family's defaults before a fit)."""
        state = self.config.preprocessing
        pre = ShowerPreprocessor.from_dict(state) if state else ShowerPreprocessor(**self.config.preprocessing_defaults)
        if pre.mode != "fraction" or pre.floor is not None:
            raise ValueError(f"caloflow works in preprocessing mode 'fraction' without a floor, not {pre!r}")
        return pre

    def flow1_data(self, e: torch.Tensor) -> torch.Tensor:
        """Layer energies (B, Z) in units of E_inc -> Flow I's logit unit space (B, Z)."""
        return logit(to_unit_space(e, self.config.total_scale), self.config.alpha)

    def layer_energies(self, w: torch.Tensor) -> torch.Tensor:
        """Flow I's output (B, Z) -> layer energies (B, Z) in units of E_inc."""
        return from_unit_space(inverse_logit(w, self.config.alpha), self.config.total_scale)

    def flow2_context(self, c, layer, e_layer, e_prev, prev) -> torch.Tensor:
        """Flow II's context (N, ...): conditions (N, C), layer index (N,), energies of the layer and the one before
        (N,) in units of E_inc (0 before layer 0), the previous layer's logit shower (N, cells)."""
        cfg = self.config
        onehot = nn.functional.one_hot(layer, cfg.mesh_shape[2]).to(c)
        le = torch.log10(e_layer.clamp_min(cfg.noise_level)) / 3
        lp = torch.where(layer > 0, torch.log10(e_prev.clamp_min(cfg.noise_level)) / 3, torch.zeros_like(le))
        return torch.cat([c, onehot, le[:, None], lp[:, None], prev / cfg.tail_bound], dim=1)

    def flow_inputs(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """The flows' training inputs from model-space showers: conditions ``c``, Flow I data ``w`` (B, Z) and
        Flow II rows ``v`` (B k, cells) with their context ``ctx`` for the step's k layers per shower."""
        cfg, (r, p, n_z) = self.config, self.config.mesh_shape
        b, k = x.shape[0], cfg.layers_per_step
        cells = self.preprocessor().inverse(x.float(), torch.ones(b, dtype=torch.float32, device=x.device))
        cells = cells + cfg.noise_level * normal_cdf(noise["noise"].float())  # dequantised, units of E_inc
        e = cells.sum(dim=(1, 2))  # (B, Z)
        v = logit(cells.reshape(b, r * p, n_z) / e[:, None, :], cfg.alpha).transpose(1, 2)  # (B, Z, cells)
        # k evenly spaced layers from a random offset: every layer equally often, no layer twice
        offset = (noise["u"][:, 0] * n_z).long().clamp_max(n_z - 1)
        layer = (offset[:, None] + torch.arange(k, device=x.device) * (n_z // k)) % n_z  # (B, k)
        rows = torch.arange(b, device=x.device)[:, None].expand(b, k)
        prev, e_prev = (v[rows, layer - 1] * (layer > 0)[..., None]), e[rows, layer - 1]
        c = condition_features(cond, cfg.n_geometry_slots)
        ctx = self.flow2_context(c.repeat_interleave(k, 0), layer.flatten(), e[rows, layer].flatten(),
                                 e_prev.flatten(), prev.flatten(0, 1))
        return {"c": c, "w": self.flow1_data(e), "v": v[rows, layer].flatten(0, 1), "ctx": ctx, "layer": layer}

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """Teacher: negative log-likelihood per dimension of Flow I (B,) and of the step's Flow II layers (B,).
        Student: the distillation losses of both flows against the teacher."""
        with torch.autocast(x.device.type, enabled=False):  # splines in float32 (iCaloFlow runs in float64)
            inp = self.flow_inputs(x, cond, noise)
            b, k = x.shape[0], self.config.layers_per_step
            if self.config.stage == "teacher":
                nll1 = -self.flow1.log_prob(inp["w"], inp["c"]) / self.flow1.features
                nll2 = -self.flow2.log_prob(inp["v"], inp["ctx"]).reshape(b, k).mean(1) / self.flow2.features
                return {"flow1": nll1, "flow2": nll2}
            teacher = self._teacher_on(x.device)
            # latents of the z-passes from the step's normals: Flow I's from one cell column, Flow II's rows from
            # the layer after theirs (independent of each row's context, which holds this and earlier layers)
            flat = noise["noise"].float().flatten(1, 2)  # (B, cells, Z)
            lat2 = torch.roll(flat, -1, dims=2).transpose(1, 2)[torch.arange(b, device=x.device)[:, None], inp["layer"]]
            out = {}
            for name, student, frozen_teacher, data, ctx, latent in (
                    ("flow1", self.flow1, teacher.flow1, inp["w"], inp["c"], flat[:, 0, :]),
                    ("flow2", self.flow2, teacher.flow2, inp["v"], inp["ctx"], lat2.flatten(0, 1))):
                parts = self.distill_losses(student, frozen_teacher, data, ctx, latent)
                for part, value in parts.items():
                    out[f"{name}_{part}"] = value.reshape(b, -1).mean(1)
            return out

    def distill_losses(self, student: ARFlow, teacher: ARFlow, data, ctx, latent) -> dict[str, torch.Tensor]:
        """CaloFlow II's losses per row: beta MSE(student(teacher^-1(data)), data) ("x") and (1 - beta)
        MSE(teacher^-1(student(latent)), latent) ("z"); with ``distill_state_weight`` also the MSEs of the K - 1
        intermediate states of both passes ("states"). The teacher's parameters are frozen: gradients reach the
        student only (through the teacher's encoding of the student's samples in the z-pass)."""
        beta, weight = self.config.distill_beta, self.config.distill_state_weight
        with torch.no_grad():
            z_t, _, t_states = teacher.encode(data, ctx, states=True)
        x_hat, x_states = student.iaf_decode(z_t, ctx, states=True)
        x_s, s_states = student.iaf_decode(latent, ctx, states=True)
        z_hat, _, r_states = teacher.encode(x_s, ctx, states=True)
        out = {"x": beta * (x_hat - data).square().mean(-1), "z": (1 - beta) * (z_hat - latent).square().mean(-1)}
        if weight > 0 and len(t_states) > 2:
            inner = range(1, len(t_states) - 1)
            out["states"] = weight * sum(beta * (x_states[i] - t_states[i]).square().mean(-1)
                                         + (1 - beta) * (r_states[i] - s_states[i]).square().mean(-1)
                                         for i in inner) / len(inner)
        return out

    def init_training(self, teacher: BaselineModel | None = None) -> None:
        """Student stage: keep ``teacher`` (a trained teacher-stage caloflow with the same flow inputs and block
        counts) frozen and unregistered, and start from its weights (``student_init: teacher``)."""
        cfg = self.config
        if teacher is None:
            if cfg.stage == "student":
                raise ValueError("a caloflow student needs its teacher (distill_from)")
            return
        if cfg.stage != "student":
            raise ValueError("caloflow distils into stage 'student' only; this model is a teacher")
        if not isinstance(teacher, CaloFlowModel) or teacher.config.stage != "teacher":
            raise ValueError("a caloflow student distils from a caloflow model of stage 'teacher'")
        differ = [f for f in _SHARED if getattr(cfg, f) != getattr(teacher.config, f)]
        if differ:
            raise ValueError(f"caloflow student and teacher differ in {differ}")
        moved = {g: s for g, s in cfg.geometry_slots.items() if teacher.config.geometry_slots.get(g) != s}
        if moved:
            raise ValueError(f"the teacher was not trained on geometries {moved} with these slots")
        if cfg.student_init == "teacher":
            if (cfg.flow1_hidden, cfg.flow2_hidden) != (teacher.config.flow1_hidden, teacher.config.flow2_hidden):
                raise ValueError("student_init 'teacher' needs the teacher's flow1_hidden and flow2_hidden; "
                                 "use student_init 'random' for other widths")
            for name in ("flow1", "flow2"):
                getattr(self, name).load_state_dict(getattr(teacher, name).state_dict())
        object.__setattr__(self, "_teacher", teacher.eval().requires_grad_(False))

    def _teacher_on(self, device) -> CaloFlowModel:
        if self._teacher is None:
            raise ValueError("a caloflow student trains against its teacher: call init_training(teacher=...)")
        if self._teacher.device != device:
            self._teacher.to(device)
        return self._teacher

    # -- sampling ------------------------------------------------------------------------------
    def _decode(self, flow: ARFlow, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return flow.decode(z, c) if self.config.stage == "teacher" else flow.iaf_decode(z, c)

    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """Flow I (layer energies), then Flow II layer by layer, each layer renormalised to its energy and cut at
        ``noise_level`` or the preprocessing's noise cut, whichever is higher; the cells (units of E_inc) mapped
        to model space (B, R, P, Z). The teacher inverts its MAFs (``network_evaluations`` sequential MADE passes),
        the student runs its IAFs (one pass per block)."""
        self.check_steps(steps)
        cfg, (r, p, n_z) = self.config, self.config.mesh_shape
        energy = cond["energy"]
        b, device = energy.shape[0], energy.device
        pre = self.preprocessor()
        cut = max(cfg.noise_level, pre.noise_cut * pre.eps)  # the sampler's noise cut would zero cells below it
        with torch.autocast(device.type, enabled=False):
            c = condition_features(cond, cfg.n_geometry_slots).float()
            z1 = torch.randn(b, n_z, generator=generator, device=device)
            e = self.layer_energies(self._decode(self.flow1, z1, c))  # (B, Z)
            prev, layers = torch.zeros(b, r * p, device=device), []
            for n in range(n_z):
                layer = torch.full((b,), n, dtype=torch.long, device=device)
                ctx = self.flow2_context(c, layer, e[:, n], e[:, n - 1] if n else e[:, 0], prev)
                z2 = torch.randn(b, r * p, generator=generator, device=device)
                v = self._decode(self.flow2, z2, ctx)
                share = inverse_logit(v, cfg.alpha)
                share = share / share.sum(dim=1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
                cells = share * e[:, n:n + 1]
                layers.append(torch.where(cells >= cut, cells, torch.zeros_like(cells)))
                prev = logit(inverse_logit(v, cfg.alpha), cfg.alpha)  # the flow's own output, in range
            cells = torch.stack(layers, dim=2).reshape(b, r, p, n_z)
            return pre.forward(cells, torch.ones(b, device=device), check=False).float()

    def network_evaluations(self, steps: int | None = None) -> int:
        """Sequential MADE passes per shower: the teacher's MAF inverses take ``passes`` per block (the features
        one by one when fully autoregressive), the student's IAFs one per block; Flow II runs once per layer."""
        n_z = self.config.mesh_shape[2]
        if self.config.stage == "teacher":
            return sum(self.flow1.passes) + n_z * sum(self.flow2.passes)
        return len(self.flow1.blocks) + n_z * len(self.flow2.blocks)


register_family(CaloFlowConfig, CaloFlowModel)
