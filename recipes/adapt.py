"""Adapt a pretrained calofm model to a new detector (same options as `calofm adapt`).

    accelerate launch recipes/adapt.py --geometry allegro --samples 200k --base runs/pretrain/model
    accelerate launch recipes/adapt.py --geometry cld --method full --steps 2000 --data cld_part1.h5 cld_part2.h5
"""

import sys

from calofm.commands.adapt import main

if __name__ == "__main__":
    sys.exit(main())
