"""What every calofm model shares: the geometry claims of its config and, for the baseline families, one
training and sampling interface.

``ShowerModelConfig`` is the base of every model config (CaloDiT and the baselines): the mesh, the geometry
one-hot, which geometries the checkpoint claims with which slot, readout threshold and card, and the
preprocessing statistics it was trained with. ``BaselineModel`` is the base of the baseline families
(``calofm.models.FAMILIES``): each implements ``losses`` (the per-sample training losses of one step) and
``generate`` (model-space showers for given conditions), and the one training loop and the one sampler
(``calofm.sampling.BaselineSampler``) do the rest.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from calofm.geometry import MESH_SHAPE, N_SLOTS

_BASE_KWARGS = {"model_type", "name_or_path", "torch_dtype", "attn_implementation", "output_attentions"}


def check_ints(config_name: str, name: str, values, low: int = 1) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise ValueError(f"{config_name}.{name}={values!r}: expected integers >= {low}")


class ShowerModelConfig(PreTrainedConfig):
    """The mesh, the geometry claims and the preprocessing statistics a checkpoint carries with it."""

    model_type = "calofm_shower"

    mesh_shape: tuple[int, int, int] = MESH_SHAPE  # (r, phi, z) cells
    n_geometry_slots: int = N_SLOTS  # width of the geometry one-hot; spare slots are for new detectors
    # ShowerPreprocessor.state_dict(), geometry name -> slot, -> threshold MeV, -> largest cell energy in the
    # training data in preprocessing units (the cell cap), -> sha256 of its card stored with the model
    # (geometries/<name>.yaml, calofm.hub.folders)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    geometry_slots: dict[str, int] = field(default_factory=dict)
    geometry_thresholds: dict[str, float] = field(default_factory=dict)
    geometry_cell_max: dict[str, float] = field(default_factory=dict)
    geometry_cards: dict[str, str] = field(default_factory=dict)

    # per-geometry entries (dicts keyed by geometry name), saved and restored together by add_geometry
    _CLAIMS = ("geometry_slots", "geometry_thresholds", "geometry_cell_max", "geometry_cards")

    def __post_init__(self, **kwargs):
        # Extra kwargs would silently become attributes (a typo like hiden_size=... gives the default size);
        # allow only the bookkeeping keys transformers itself passes and consumes.
        unknown = sorted(k for k in kwargs if k not in _BASE_KWARGS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown key(s) {unknown}")
        self.mesh_shape = tuple(self.mesh_shape)  # config.json stores tuples as lists
        self.geometry_slots = dict(self.geometry_slots or {})
        self.geometry_thresholds = {k: float(v) for k, v in (self.geometry_thresholds or {}).items()}
        self.geometry_cell_max = {k: float(v) for k, v in (self.geometry_cell_max or {}).items()}
        self.geometry_cards = dict(self.geometry_cards or {})
        self.preprocessing = dict(self.preprocessing or {})
        self._normalise()
        self._check()
        super().__post_init__(**kwargs)

    def _normalise(self) -> None:
        """Subclasses: turn config.json's lists back into tuples and the like (before ``_check``)."""

    def _check(self) -> None:
        """Every value, and that every per-geometry entry is about a claimed geometry."""
        name = type(self).__name__
        check_ints(name, "mesh_shape", self.mesh_shape)
        if len(self.mesh_shape) != 3:
            raise ValueError(f"{name}: mesh_shape needs 3 entries (r, phi, z)")
        check_ints(name, "n_geometry_slots", [self.n_geometry_slots], low=N_SLOTS)
        slots, n_slots = list(self.geometry_slots.values()), self.n_geometry_slots
        if not all(isinstance(s, int) and 0 <= s < n_slots for s in slots) or len(set(slots)) < len(slots):
            raise ValueError(f"geometry_slots {self.geometry_slots}: need distinct ints in [0, {n_slots})")
        for attr in ShowerModelConfig._CLAIMS[1:]:
            if set(getattr(self, attr)) - set(self.geometry_slots):
                raise ValueError(f"{attr} names a geometry that is not in geometry_slots")
        if any(t < 0 for t in self.geometry_thresholds.values()):
            raise ValueError("geometry_thresholds must be >= 0 MeV")
        if not all(0 < v < math.inf for v in self.geometry_cell_max.values()):
            raise ValueError(f"geometry_cell_max {self.geometry_cell_max}: values must be finite and > 0")
        if not all(isinstance(h, str) and len(h) == 64 for h in self.geometry_cards.values()):
            raise ValueError(f"geometry_cards {self.geometry_cards}: values must be sha256 hex digests")

    # The geometry claims change only through these two methods (and are checked again on save), so a
    # config that saves always loads: one slot per geometry, every entry about a claimed geometry.
    def add_geometry(self, name: str, slot: int, threshold: float, cell_max: float | None = None,
                     card_sha256: str | None = None, **extra) -> None:
        """Claim ``slot`` for geometry ``name``: its own slot if the config knows it, else a free one.
        ``extra``: per-geometry entries of a subclass (``_claim_extra``)."""
        known = self.geometry_slots.get(name)
        if known is not None and known != slot:
            raise ValueError(f"geometry '{name}' has slot {known} in the model, not {slot}")
        owner = next((g for g, s in self.geometry_slots.items() if s == slot and g != name), None)
        if owner is not None:
            raise ValueError(f"slot {slot} for geometry '{name}' is already used by '{owner}'")
        old = {attr: getattr(self, attr) for attr in self._CLAIMS}
        self.geometry_slots = {**self.geometry_slots, name: slot}
        self.geometry_thresholds = {**self.geometry_thresholds, name: float(threshold)}
        if cell_max is not None:
            self.geometry_cell_max = {**self.geometry_cell_max, name: float(cell_max)}
        if card_sha256 is not None:
            self.geometry_cards = {**self.geometry_cards, name: card_sha256}
        try:
            self._claim_extra(name, **extra)
            self._check()
        except ValueError:
            for attr, value in old.items():
                setattr(self, attr, value)
            raise

    def _claim_extra(self, name: str, **extra) -> None:
        """Subclasses: store per-geometry entries beyond the base ones (listed in their ``_CLAIMS``)."""
        if any(v is not None for v in extra.values()):
            raise ValueError(f"{type(self).__name__}.add_geometry: unexpected {sorted(extra)}")

    def keep_geometries(self, names) -> None:
        """Claim only ``names`` (a model trained further on them no longer generates the others as trained)."""
        names = set(names)
        unknown = sorted(names - set(self.geometry_slots))
        if unknown:
            raise ValueError(f"keep_geometries: {unknown} not in geometry_slots")
        for attr in ShowerModelConfig._CLAIMS:
            setattr(self, attr, {k: v for k, v in getattr(self, attr).items() if k in names})

    def save_pretrained(self, *args, **kwargs):
        self._check()  # also after direct edits of the attributes: never save what cannot be loaded
        return super().save_pretrained(*args, **kwargs)

    @property
    def factorised(self) -> bool:
        return False


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not match the model exactly (missing, unexpected or reshaped keys)."""


class StrictLoading:
    """Mixin for every calofm ``PreTrainedModel``: strict, float32, safetensors-only ``from_pretrained``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=torch.float32, strict=True,
                        use_safetensors=True, **kwargs):
        """transformers' loader, but float32 unless a dtype is asked for, strict about tensor keys and safetensors
        only (transformers 5 defaults to dtype="auto", falls back to a pickled ``pytorch_model.bin`` and only logs
        missing/unexpected keys): a key mismatch raises CheckpointMismatchError when strict, and a folder holding
        only a ``.bin`` is an OSError, never unpickled (also through ``AutoModel.from_pretrained``)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, dtype=dtype,
                                              use_safetensors=use_safetensors, output_loading_info=True, **kwargs)
        problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys")}
        problems["mismatched_keys"] = sorted(str(k) for k in info.get("mismatched_keys") or ())
        problems = {k: v for k, v in problems.items() if v}
        if strict and (problems or info.get("error_msgs")):
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in problems.items()) or str(info["error_msgs"])
            raise CheckpointMismatchError(f"{pretrained_model_name_or_path}: checkpoint does not match model: {detail}")
        return (model, info) if want_info else model


class BaselineModel(StrictLoading, PreTrainedModel):
    """A baseline family: one ``PreTrainedModel`` that trains in calofm's loop and samples through
    ``calofm.load(...).sample``.

    Conventions shared by every family:

    - ``x`` is a batch of showers (B, R, P, Z) in the model space of ``config.preprocessing``
      (``calofm.preprocess.ModelSpace``); ``cond`` holds ``energy`` (GeV), ``phi``, ``theta`` (rad) and
      ``geometry`` (slot index), each (B,).
    - ``noise`` is the step's randomness from ``calofm.training.objective.step_noise``, drawn from a generator
      keyed by (seed, step) so W processes and resumed runs reproduce a 1-process run exactly: ``noise``
      (B, R, P, Z) standard normal (a family slices latent vectors out of it), ``sigma`` (B,) log-normal and
      ``u`` (B, 2) uniform in [0, 1). A family draws nothing else at training time.
    - one optimiser steps every parameter on every step; an adversarial family trains generator and critic
      together (gradient-reversing the critic's part of the generator loss by evaluating the critic with
      detached parameters), so there is no second optimiser and nothing the loop must know about.
    """

    main_input_name = "x"
    trainable = True  # False: nothing to train (recipes/train.py writes the model folder straight away)
    family = ""  # registry name (calofm.models.FAMILIES)
    title = ""  # the family's name in the literature
    summary = ""  # what it is, one sentence for model cards
    default_steps = 1  # sampling steps unless told otherwise; 1 for one-pass models
    generates_mev = False  # generate() returns MeV on the mesh (the parametrised simulator), not model space

    uses_ema_target = False  # True: ``losses`` also receives ``ema`` (a target network for distillation)

    def losses(self, x: torch.Tensor, cond: dict, noise: dict, ema: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-sample training losses {name: (B,)} of one step; the loop minimises their sum. With
        ``uses_ema_target``, ``ema`` is {parameter name: tensor} of the loop's moving average of this model's
        trainable parameters (float32), e.g. the target network of consistency distillation through
        ``torch.func.functional_call``; it must not be modified."""
        raise NotImplementedError

    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """Showers (B, R, P, Z) in model space for ``cond`` (as in training); ``generator`` (on the device)
        drives all randomness, so a seed gives the same showers. ``geometries``: {slot: Geometry} of the
        requested rows, for a family that needs the detector description (the parametrised simulator)."""
        raise NotImplementedError

    def init_training(self, teacher: BaselineModel | None = None) -> None:
        """Called once when a training run builds the model, before the optimiser exists: ``teacher`` is the
        trained model named by ``config.distill_from`` for a family that distils (else None). Default: a
        teacher is refused."""
        if teacher is not None:
            raise ValueError(f"{self.family} does not distil from a teacher")

    def finish_training(self, data, space, samples: int) -> None:
        """Called once on the final (EMA) weights before the model is saved, with the training set
        (``calofm.data.dataset.ShowerDataset``), its ``ModelSpace`` and how many showers per geometry to look
        at: e.g. fit a density on the training set's latent space. Default: nothing."""

    def network_evaluations(self, steps: int | None = None) -> int:
        """Network passes per shower at ``steps`` (one-pass families: their fixed count)."""
        return 1

    def check_steps(self, steps: int | None) -> int:
        """``steps`` or the default, refused where the family has no such choice."""
        if steps is not None and steps != self.default_steps and self.default_steps == 1:
            raise ValueError(f"{self.family} samples in one pass: --steps does not apply")
        return self.default_steps if steps is None else int(steps)


COND_FEATURES = 4  # log energy, cos phi, sin phi, theta - pi/2 (then the geometry one-hot)


def condition_features(cond: dict, n_slots: int) -> torch.Tensor:
    """The conditions as one vector per shower (B, 4 + n_slots), each entry O(1): log10(E / GeV) / 3 (0 at
    1 GeV, 1 at 1 TeV), cos and sin of phi, theta - pi/2 (0 for a particle perpendicular to the detector)
    and the geometry one-hot. The baseline families condition on this, as CaloDiT does on its embeddings."""
    e = torch.log10(cond["energy"].float().clamp_min(1e-4)) / 3.0
    phi, theta = cond["phi"].float(), cond["theta"].float()
    onehot = torch.nn.functional.one_hot(cond["geometry"].long(), n_slots).to(e.dtype)
    return torch.cat([torch.stack([e, phi.cos(), phi.sin(), theta - math.pi / 2], dim=1), onehot], dim=1)


def frozen(module: torch.nn.Module, *args) -> torch.Tensor:
    """``module(*args)`` with its parameters detached: gradients reach the inputs, never the module (the
    generator's adversarial term of a family trained by one optimiser, see ``BaselineModel``)."""
    params = {k: p.detach() for k, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def register_family(config_class: type, model_class: type) -> None:
    """Make ``AutoConfig`` / ``AutoModel.from_pretrained`` load this family (no remote code); called at the
    bottom of each family's module."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
