"""Shared helpers of the training and adaptation tests: tiny configs and in-process runs."""

from pathlib import Path

from calofm.training.config import TrainConfig
from calofm.training.pretrain import build_pretrain_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    {"geometry": "par04_siw", "samples": 384, "val_samples": 64, "energy": [5.0, 50.0], "weight": 2.0},
    {"geometry": "ild", "samples": 384, "val_samples": 64, "energy": [10.0, 50.0]},
]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_config(out, cache, **kw) -> dict:
    cfg = {
        "output_dir": str(out), "seed": 3, "steps": 12, "batch_size": 16, "log_every": 1, "val_every": 6,
        "save_every": 100, "tensorboard": False, "ema_decay": 0.9,
        # the single variant here; tests/test_factorised.py runs the same chain with the default, factorised
        "model": {"preset": "tiny", "variant": "single"},
        "data": {"sources": SOURCES, "cache_dir": str(cache), "num_workers": 0, "stats_samples": 128},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
    }
    for key, value in kw.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def run(cfg: dict) -> Path | None:
    from calofm.config import from_dict
    from calofm.training.loop import Setup, train

    reset_accelerate()
    tc = from_dict(TrainConfig, cfg)
    return train(tc, Setup(build=build_pretrain_model(tc), save=save_pretrained))


