"""The whole pipeline (generate -> train -> eval, for `pipeline.rounds`) as a Ray job.

    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config default \
        runs_dir=/mnt/shared/runs name=bio

Resubmitting the same command after a failure skips the stages `pipeline.json`
records as finished and resumes the one that was interrupted.
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("pipeline", command="run"))
