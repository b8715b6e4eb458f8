"""LoRA fine-tuning as a Ray job: Ray Train workers across the cluster.

    ray job submit --working-dir . -- python -m ray_jobs.train --config default \
        name=bio train.num_workers=4 train.use_gpu=true [--resume]
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("train"))
