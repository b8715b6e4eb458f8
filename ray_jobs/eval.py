"""Base-vs-adapter evaluation as a Ray job: model replicas score the tasks.

    ray job submit --working-dir . -- python -m ray_jobs.eval --config default \
        name=bio eval.replicas=2 [--tasks builtin:biomedical] [--models base,DIR]
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("eval"))
