"""``import calofm`` alone lets transformers' AutoModel load a saved CaloDiT, and does not import torch."""

import subprocess
import sys
from pathlib import Path

import torch

from calofm.hub.folders import save_model
from calofm.models import CaloDiTModel, preset_config

ROOT = Path(__file__).resolve().parents[1]


def test_import_calofm_registers_automodel_lazily(tmp_path):
    net = CaloDiTModel(preset_config("tiny", geometry_slots={"par04_siw": 0}))
    save_model(net, tmp_path / "m", {})
    code = (
        "import sys, calofm\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import calofm stays light'\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'm')!r})\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    name, count = out.stdout.split()
    assert name == "CaloDiTModel" and int(count) == sum(p.numel() for p in net.parameters())
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "m")
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
