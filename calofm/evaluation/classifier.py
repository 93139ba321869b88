"""The CaloChallenge binary classifier test: can a DNN tell generated from reference showers?

Recipe (CaloChallenge/homepage code/evaluate.py): Linear(in, 2048)-LeakyReLU,
2 x [Linear(2048, 2048)-LeakyReLU], Linear(2048, 1); Adam lr 2e-4, batch 1000, 50 epochs; split 0.6/0.2/0.2
per class; keep the epoch with the best test accuracy; isotonic calibration fit on the test split; AUC and
JSD = (log 2 - BCE) / log 2 on the validation split.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 2048
    n_hidden_layers: int = 2  # CaloChallenge ``cls_n_layer``: hidden (width x width) layers after the first
    epochs: int = 50
    lr: float = 2e-4
    batch_size: int = 1000
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / test (model choice, calibration) / validation
    n_runs: int = 1  # independent trainings (new split and initialisation); the paper uses 10
    seed: int = 0
    device: str | None = None  # None: CUDA if available, else CPU

    def __post_init__(self):
        if self.hidden < 1 or self.n_hidden_layers < 0 or self.epochs < 1 or self.batch_size < 1 or self.n_runs < 1:
            raise ValueError(f"invalid classifier settings {asdict(self)}")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"classifier split {self.split} must be three positive fractions summing to 1")


FULL_RECIPE = ClassifierConfig()
# CPU default: the pre-2023-11 CaloChallenge width (512), 10 epochs, and batch 250 so that ~10k showers
# (not the recipe's 60k training showers) still give ~500 optimiser steps; minutes instead of ~30 on 2 cores.
CPU_RECIPE = ClassifierConfig(hidden=512, epochs=10, batch_size=250)


def default_config(device: str | None = None) -> ClassifierConfig:
    """The full recipe on a GPU, the cheaper CPU recipe otherwise."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return replace(FULL_RECIPE if dev.startswith("cuda") else CPU_RECIPE, device=dev)


def build_dnn(n_in: int, config: ClassifierConfig):
    """The CaloChallenge DNN (logits out; dropout 0 is omitted)."""
    from torch import nn

    layers = [nn.Linear(n_in, config.hidden), nn.LeakyReLU()]
    for _ in range(config.n_hidden_layers):
        layers += [nn.Linear(config.hidden, config.hidden), nn.LeakyReLU()]
    layers.append(nn.Linear(config.hidden, 1))
    return nn.Sequential(*layers)


def split_data(ref: np.ndarray, gen: np.ndarray, split, rng: np.random.Generator):
    """Per-class shuffled train/test/validation split, classes merged and shuffled; label 1 = reference."""
    if len(ref) != len(gen):
        raise ValueError(f"classifier test needs equal sample sizes, got {len(ref)} reference, {len(gen)} generated")
    cuts = np.cumsum((len(ref) * np.asarray(split[:2])).astype(int))
    parts = []
    for data, label in ((ref, 1.0), (gen, 0.0)):
        idx = rng.permutation(len(data))
        parts.append([(data[i], np.full(len(i), label, dtype=np.float32)) for i in np.split(idx, cuts)])
    out = []
    for (x1, y1), (x2, y2) in zip(*parts):
        order = rng.permutation(len(x1) + len(x2))
        out.append((np.concatenate([x1, x2])[order], np.concatenate([y1, y2])[order]))
    return out


def _predict(model, x, device, batch: int = 4096) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = torch.as_tensor(x[start : start + batch], device=device)
            out.append(torch.sigmoid(model(xb)).squeeze(1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def train_classifier(train, test, config: ClassifierConfig, seed: int, progress: bool = False):
    """Train with Adam on BCE; returns the model at the epoch of best test accuracy and that accuracy."""
    import torch
    from tqdm.auto import tqdm

    device = config.device or "cpu"
    torch.manual_seed(seed)
    model = build_dnn(train[0].shape[1], config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x, y = torch.as_tensor(train[0], device=device), torch.as_tensor(train[1], device=device)
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_state = -1.0, None
    bar = tqdm(range(config.epochs), desc="classifier epochs", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x), generator=gen).to(device)
        for start in range(0, len(x), config.batch_size):
            idx = perm[start : start + config.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
            loss.backward()
            opt.step()
        acc = float(np.mean((_predict(model, test[0], device) > 0.5) == (test[1] > 0.5)))
        bar.set_postfix(test_acc=f"{acc:.3f}")
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
            log.debug("epoch %d: test accuracy %.4f (best)", epoch, acc)
        if acc >= 1.0:  # perfectly separable: more epochs cannot change the verdict
            break
    model.load_state_dict(best_state)
    return model, best_acc


def calibrated_scores(p_test, y_test, p_val, y_val) -> dict[str, float]:
    """Isotonic calibration fit on the test split, applied to validation: AUC and JSD = (log 2 - BCE)/log 2."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import log_loss, roc_auc_score

    iso = IsotonicRegression(y_min=1e-6, y_max=1 - 1e-6, out_of_bounds="clip").fit(p_test, y_test)
    cal = np.clip(iso.predict(p_val), 1e-6, 1 - 1e-6)
    bce = log_loss(y_val, cal, labels=[0.0, 1.0])
    return {"auc": float(roc_auc_score(y_val, cal)), "jsd": float((math.log(2) - bce) / math.log(2)), "bce": float(bce)}


def classifier_test(
    ref: np.ndarray, gen: np.ndarray, config: ClassifierConfig | None = None, progress: bool = False
) -> dict:
    """AUC and JSD (mean, std over ``n_runs`` trainings) of reference (label 1) vs generated (label 0) inputs."""
    config = config or default_config()
    ref = np.asarray(ref, dtype=np.float32)
    gen = np.asarray(gen, dtype=np.float32)
    runs = []
    for run in range(config.n_runs):
        seed = config.seed + run
        train, test, val = split_data(ref, gen, config.split, np.random.default_rng(seed))
        model, acc = train_classifier(train, test, config, seed, progress)
        device = config.device or "cpu"
        scores = calibrated_scores(_predict(model, test[0], device), test[1], _predict(model, val[0], device), val[1])
        scores["test_accuracy"] = acc
        runs.append(scores)
        log.info("classifier run %d/%d: AUC %.4f, JSD %.4f", run + 1, config.n_runs, scores["auc"], scores["jsd"])
    auc = np.array([r["auc"] for r in runs])
    jsd = np.array([r["jsd"] for r in runs])
    return {
        "auc": float(auc.mean()),
        "auc_std": float(auc.std(ddof=1)) if len(runs) > 1 else 0.0,
        "jsd": float(jsd.mean()),
        "jsd_std": float(jsd.std(ddof=1)) if len(runs) > 1 else 0.0,
        "n_inputs": int(ref.shape[1]),
        "n_train": int(len(ref) * config.split[0]) * 2,
        "runs": runs,
        "config": {k: v for k, v in asdict(config).items()},
    }
