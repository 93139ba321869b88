"""The one training loop (pretraining and adaptation), in Accelerate's canonical shape.

Exactness: the rows of every global batch (``StepBatchSampler``), the EDM noise, sigma and condition
dropout of every micro-step are drawn from generators keyed by ``(seed, micro-step)`` and sliced per
process (``calofm.training.objective.step_noise``, on the device). So W processes see exactly the
global batch one process sees, and a resumed run continues the same loss curve (model, optimiser,
scheduler, EMA and step are restored from a checkpoint written by ``calofm.training.checkpoint``,
without pickle). Nothing waits for the device in a step that does not log: the loss and gradient norm
are read back only at ``log_every``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from calofm.cards import card_bytes
from calofm.config import to_dict
from calofm.data.dataset import StepBatchSampler, make_loader, sequential_batches
from calofm.data.integrity import write_json
from calofm.data.output import check_output
from calofm.diffusion import EDM_DEFAULTS, edm_constant
from calofm.ema import EMA
from calofm.geometry import Geometry
from calofm.hub.folders import CARDS_DIR
from calofm.preprocess import ModelSpace
from calofm.training.checkpoint import GracefulStop, checkpoints, load_latest, save_checkpoint
from calofm.training.config import TrainConfig
from calofm.training.data import RunData, prepare_data
from calofm.training.objective import DiffusionObjective, step_noise
from calofm.training.record import RECORD, training_record
from calofm.training.tracking import trackers, trim_metrics

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What differs between pretraining and adaptation: how the network is built and what is saved."""

    build: Callable[[RunData], tuple[nn.Module, ModelSpace]]  # -> raw network F, its model space
    save: Callable[[nn.Module, Path, dict[str, Geometry]], None]  # (EMA network, output dir, the run's cards)
    # optional extra metrics at every validation point, e.g. a fidelity metric of generated showers:
    # (network with EMA weights, step) -> {name: value}; runs on the main process
    evaluate: Callable[[nn.Module, int], dict] | None = None
    kind: str = "pretrained"  # what calofm_training.json calls the run: pretrained, lora, full, scratch, distilled
    # the module whose forward(x, cond, noise) gives the per-sample loss (B,) and whose parts(...) the validation
    # losses, built from (network, EMA); default: the EMA loss of DiffusionObjective. Its ``net`` is what trains.
    objective: Callable[[nn.Module, EMA], nn.Module] | None = None

    def make_objective(self, net: nn.Module, ema: EMA) -> nn.Module:
        return self.objective(net, ema) if self.objective is not None else DiffusionObjective(net)


class TrainState:
    """The step counter (stored in every checkpoint's state.json)."""

    def __init__(self):
        self.step = 0


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT): biases, norms and embeddings' 1-D tensors are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class _EDM:
    """EDM constants of a network (for drawing the training noise)."""

    def __init__(self, net: nn.Module):
        for name in EDM_DEFAULTS:
            setattr(self, name, edm_constant(net, name))


def _noise(x, space: ModelSpace, edm, seed, micro, rank, world, drop_p, device) -> dict:
    width = space.profile.width if space.factorised else None
    return step_noise(x.shape, width, seed, micro, rank, world, edm, drop_p, device)


@torch.no_grad()
def validate(net: nn.Module, space: ModelSpace, data: RunData, acc: Accelerator, batch: int = 128,
             objective: nn.Module | None = None) -> dict:
    """Loss per geometry on fixed noise (val/<geometry>, and val_profile/<geometry> for the energy model of
    the factorised variant); batches are shared out over processes. ``objective``: default the EDM loss."""
    objective, edm = (objective or DiffusionObjective(net)).eval(), _EDM(net)
    out = {}
    for name, ds in data.val.items():
        total = torch.zeros(3, device=acc.device, dtype=torch.float64)
        for k, b in enumerate(sequential_batches(ds, batch)):
            if k % acc.num_processes != acc.process_index:
                continue
            x, cond = space.inputs(b, acc.device)
            parts = objective.parts(x, cond, _noise(x, space, edm, 10_000, k, 0, 1, 0.0, acc.device))
            profile = parts["profile"].double().sum() if "profile" in parts else torch.zeros((), device=acc.device)
            total += torch.stack([parts["shower"].double().sum(), profile.to(total),
                                  torch.tensor(float(len(x)), device=acc.device)])
        total = acc.reduce(total, reduction="sum")
        out[f"val/{name}"] = float(total[0] / total[2])
        if space.factorised:
            out[f"val_profile/{name}"] = float(total[1] / total[2])
    return out


def train(cfg: TrainConfig, setup: Setup, accelerator: Accelerator | None = None) -> Path | None:
    """Run (or resume) training; returns the folder of the final EMA model (None when stopped at ``stop_at``).

    Inputs are checked before the run folder is created (data values, base model, checkpoints, cards). A
    folder this call created is removed again if it fails before leaving a checkpoint or a model.
    """
    cfg.validate()  # also after changes made in code since construction
    out = Path(cfg.output_dir)
    check_output(out, run_inputs(cfg), kind="run")  # never onto, into or around the base model or a data file
    created = not out.exists()
    if (out / "model").exists() and not checkpoints(out / "checkpoints"):
        raise ValueError(f"{out / 'model'}: this run has finished already; use another output_dir")
    acc = accelerator or Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers(out, cfg.tensorboard),
        project_config=ProjectConfiguration(project_dir=str(out)),
    )
    try:
        with GracefulStop(enabled=acc.num_processes == 1) as stop:
            return _train(cfg, setup, acc, out, stop)
    except BaseException:
        if created and acc.is_main_process and out.exists() and not checkpoints(out / "checkpoints") \
                and not (out / "model").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing resumable or usable in it: leave nothing behind
        raise


def run_inputs(cfg: TrainConfig) -> list[Path]:
    """What a run reads and must never write: the data files and a local base model (``init_from``)."""
    files = [Path(f).expanduser() for src in cfg.data.sources for f in src.files]
    base = Path(cfg.model.init_from).expanduser() if cfg.model.init_from else None
    return files + ([base] if base is not None and base.is_dir() else [])


def _train(cfg: TrainConfig, setup: Setup, acc: Accelerator, out: Path, stop: GracefulStop) -> Path | None:
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    with acc.main_process_first():
        data = prepare_data(cfg.data, progress=acc.is_local_main_process, check_values=acc.is_main_process)
    check_run_cards(out, data.geometries)
    net, space = setup.build(data)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(net, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    # not prepared: a prepared scheduler steps once per process per optimiser step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema, state, edm = EMA(net, cfg.ema_decay), TrainState(), _EDM(net)
    # the objective (both networks of the factorised variant) is what is prepared: one forward per step
    model, opt = acc.prepare(setup.make_objective(net, ema), opt)
    ckpts = out / "checkpoints"
    if not cfg.resume and checkpoints(ckpts):
        raise ValueError(f"{ckpts}: holds checkpoints of an earlier run but resume is off; use another output_dir")
    state.step, resumed = load_latest(ckpts, acc.unwrap_model(model).net, opt, sched, ema, acc.scaler)
    if resumed is not None:
        acc.print(f"resumed from {resumed} at step {state.step}")
    ema.to(acc.device)
    if acc.is_main_process:
        trim_metrics(out / "logs" / "metrics.jsonl", state.step)  # records past the checkpoint are logged again
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_run_cards(out, data.geometries)
    acc.init_trackers("calofm", config={"world": acc.num_processes, **_flat(to_dict(cfg))})

    def checkpoint():
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(ckpts, state.step, acc.unwrap_model(model).net, opt, sched, ema, acc.scaler,
                            keep=cfg.keep_checkpoints)
        acc.wait_for_everyone()

    micro_batch = cfg.batch_size // cfg.grad_accum  # global size of one micro-batch
    sampler = StepBatchSampler(data.train.sizes, micro_batch, cfg.steps * cfg.grad_accum, seed=cfg.seed,
                               weights=data.train.weights, start_step=state.step * cfg.grad_accum,
                               rank=acc.process_index, world=acc.num_processes)
    loader = make_loader(data.train, sampler, num_workers=cfg.data.num_workers)
    drop_p = float(getattr(net.config, "cond_dropout", 0.0) or 0.0)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not acc.is_local_main_process, desc="train")
    start_step = state.step
    stop.arm()
    if state.step == 0:
        _validate_and_log(acc, model, ema, space, data, setup, 0)
    model.train()
    micro = state.step * cfg.grad_accum
    t_wait, t_last, last_logged = 0.0, time.perf_counter(), state.step
    loss_sum = torch.zeros((), device=acc.device)  # over the micro-batches of one optimiser step
    batches = iter(loader)
    while state.step < cfg.steps:
        if stop.requested and micro % cfg.grad_accum == 0:  # between optimiser steps: a consistent state
            bar.close()
            if state.step > start_step:
                checkpoint()
                acc.print(f"checkpoint at step {state.step} saved in {ckpts}; run the same command to resume")
            raise KeyboardInterrupt
        t0 = time.perf_counter()
        batch = next(batches)
        t_wait += time.perf_counter() - t0
        x, cond = space.inputs(batch, acc.device)
        noise = _noise(x, space, edm, cfg.seed, micro, acc.process_index, acc.num_processes, drop_p, acc.device)
        with acc.accumulate(model):
            with acc.autocast():
                loss = model(x, cond, noise).mean()
            acc.backward(loss)
            loss_sum += loss.detach().float()
            grad_norm = acc.clip_grad_norm_(params, cfg.optim.grad_clip) if acc.sync_gradients else None
            opt.step()
            opt.zero_grad()
        micro += 1
        if not acc.sync_gradients:
            continue
        sched.step()
        ema.update(acc.unwrap_model(model).net)
        state.step += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            loss_avg = acc.gather((loss_sum / cfg.grad_accum)[None]).mean().item()  # the global batch's loss
            now = time.perf_counter()
            elapsed = now - t_last
            record = {"loss": loss_avg, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "samples_per_s": cfg.batch_size * (state.step - last_logged) / elapsed,
                      "data_wait": t_wait / elapsed}
            acc.log(record, step=state.step)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            t_wait, t_last, last_logged = 0.0, now, state.step
        loss_sum.zero_()
        if state.step % cfg.val_every == 0 or state.step == cfg.steps:
            _validate_and_log(acc, model, ema, space, data, setup, state.step)
        if state.step == cfg.stop_at and state.step < cfg.steps:
            checkpoint()
            acc.print(f"stopping at step {state.step} as asked (stop_at); run again to resume")
            bar.close()
            acc.end_training()
            return None
        if state.step % cfg.save_every == 0 and state.step < cfg.steps:
            checkpoint()
    bar.close()
    final = out / "model"
    acc.wait_for_everyone()
    if acc.is_main_process:
        setup.save(_ema_copy(acc, model, ema), final, data.geometries)
        record = training_record(cfg, data, setup.kind, acc.num_processes, str(acc.mixed_precision),
                                 time.perf_counter() - t_run, start_step)
        write_json(final / RECORD, record)  # descriptive only (the model card's source), so outside the manifest
        acc.print(f"saved {final}")
    acc.wait_for_everyone()
    acc.end_training()
    return final


def check_run_cards(out: Path, geometries: dict[str, Geometry]) -> None:
    """A resumed run must use the cards it started with (they decide the data and the saved model)."""
    for name, geometry in geometries.items():
        stored = out / CARDS_DIR / f"{name}.yaml"
        if stored.is_file() and stored.read_bytes() != card_bytes(geometry):
            raise ValueError(f"{geometry.source or name}: card of geometry '{name}' differs from the one this run "
                             f"started with ({stored}); use another output_dir or the same card")


def write_run_cards(out: Path, geometries: dict[str, Geometry]) -> None:
    (out / CARDS_DIR).mkdir(exist_ok=True)
    for name, geometry in geometries.items():
        (out / CARDS_DIR / f"{name}.yaml").write_bytes(card_bytes(geometry))


def _validate_and_log(acc, model, ema, space, data, setup: Setup, step: int) -> None:
    net = _ema_copy(acc, model, ema)
    record = validate(net, space, data, acc, objective=setup.make_objective(net, ema))
    if setup.evaluate is not None and acc.is_main_process:
        record.update(setup.evaluate(net, step))
    acc.log(record, step=step)


def _ema_copy(acc: Accelerator, model: nn.Module, ema: EMA) -> nn.Module:
    """A detached copy of the network holding the EMA weights (the training weights stay untouched)."""
    import copy

    net = copy.deepcopy(acc.unwrap_model(model).net)
    ema.copy_to(net)
    return net.eval()


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> flat {a.b: value} of scalars (TensorBoard hparams accept no lists or dicts)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
