"""Pretrain the calofm foundation model on several detector geometries.

    accelerate launch recipes/pretrain.py                                # embedded CPU demo (~10 min, 2 cores)
    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_small.yaml --steps 3000
    accelerate launch --mixed_precision bf16 --multi_gpu recipes/pretrain.py --config recipes/configs/lemurs_base.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 recipes/pretrain.py

Unknown keys and wrong types are errors; the run resumes from its newest checkpoint when restarted.
"""

import sys

from calofm.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
