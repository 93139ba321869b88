"""Multi-geometry pretraining: ``accelerate launch recipes/pretrain.py [--config X.yaml] [--key value ...]``."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from calofm.hub.folders import load_model, save_model
from calofm.preprocess import ModelSpace, ProfilePreprocessor, ShowerPreprocessor
from calofm.training.config import TrainConfig
from calofm.training.data import RunData, cell_maxima, fit_preprocessor, fit_profile

log = logging.getLogger(__name__)


def build_pretrain_model(cfg: TrainConfig) -> callable:
    """Setup.build for pretraining: a fresh (or ``init_from``) CaloDiT with the run's geometry slots and stats."""

    def build_model(data: RunData) -> tuple[nn.Module, ModelSpace]:
        from calofm.models import CaloDiTModel, preset_config

        m, stats_n = cfg.model, cfg.data.stats_samples
        slots = {name: g.slot for name, g in data.geometries.items()}
        thresholds = {name: g.card.threshold for name, g in data.geometries.items()}
        if m.init_from:
            net, _, _ = load_model(m.init_from)
            space = ModelSpace.from_config(net.config)
            cell_max = {} if space.factorised else cell_maxima(data.train, stats_n, space.shower)
            try:  # the base's claims are checked first: a geometry keeps its slot, a slot keeps its geometry
                for name, g in data.geometries.items():
                    net.config.add_geometry(name, g.slot, g.card.threshold, cell_max.get(name))
            except ValueError as err:
                raise ValueError(f"{m.init_from}: {err}") from None
            if space.factorised:  # geometries new to the model get their profile statistics; known ones keep theirs
                new = {n: g.slot for n, g in data.geometries.items() if n not in space.profile.geometries}
                if new:
                    fit_profile(data.train, stats_n, new, space.profile)
                net.config.profile_preprocessing = space.profile.state_dict()
            # trained further on these geometries only: it no longer generates the others as the base did
            net.config.keep_geometries(data.geometries)
            return net, ModelSpace.from_config(net.config)
        p = cfg.preprocess
        factorised = m.variant == "factorised"
        noise_cut = p.noise_cut if p.noise_cut is not None else (0.75 if factorised else 2.0)
        mode = p.mode or "fraction"  # both variants: the factorised one then rescales each layer (docs/fidelity.md)
        pre = fit_preprocessor(data.train, stats_n, ShowerPreprocessor(mode=mode, eps=p.eps, noise_cut=noise_cut,
                                                                       floor=p.floor))
        profile = None
        if factorised:
            profile = fit_profile(data.train, stats_n, slots,
                                  ProfilePreprocessor(eps=p.profile_eps, noise_cut=p.profile_noise_cut))
        # checks that mode and variant go together
        space = ModelSpace(pre, profile, {slots[n]: t for n, t in thresholds.items()})
        overrides = {k: v for k, v in (("hidden_size", m.hidden_size), ("num_hidden_layers", m.num_hidden_layers),
                                       ("num_attention_heads", m.num_attention_heads),
                                       ("cond_dropout", m.cond_dropout), ("P_mean", m.P_mean),
                                       ("P_std", m.P_std)) if v is not None}
        config = preset_config(
            m.preset, variant=m.variant, geometry_slots=slots, geometry_thresholds=thresholds,
            # the cell cap guards the single variant's energy; the factorised one is energy-true by construction
            geometry_cell_max={} if factorised else cell_maxima(data.train, stats_n, pre),
            preprocessing=pre.state_dict(), profile_preprocessing=profile.state_dict() if profile else {},
            **overrides)
        net = CaloDiTModel(config)
        log.info("CaloDiT %s (%s): %.2fM parameters", m.preset, m.variant,
                 sum(p.numel() for p in net.parameters()) / 1e6)
        return net, space

    return build_model


def save_pretrained(net: nn.Module, out: Path, geometries: dict) -> None:
    """The final model folder: weights, config and the cards of the run's geometries (calofm.hub.folders)."""
    save_model(net, out, geometries)
