"""Train any model family on the common task: CaloDiT or a baseline (CaloDiffusion, BIB-AE, WGAN, GFlash).

    accelerate launch recipes/train.py --model calodiffusion                  # recipes/configs/baselines/*.yaml
    accelerate launch recipes/train.py --model wgan --steps 2000 --output_dir runs/wgan
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/train.py --model bibae

Unknown keys and wrong types are errors; the run resumes from its newest checkpoint when restarted.
"""

import sys
from pathlib import Path

from calofm.commands.train import main

if __name__ == "__main__":
    sys.exit(main(config_dir=Path(__file__).resolve().parent / "configs" / "baselines"))
