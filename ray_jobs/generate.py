"""Generation stage as a Ray job: model actors on Ray Data across the cluster.

    ray job submit --working-dir . -- python -m ray_jobs.generate --config default \
        runs_dir=s3://bucket/runs name=bio generate.replicas=4 generate.num_gpus_per_replica=1

A resubmitted job resumes from the run directory's manifest (finished rounds are kept).
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("generate"))
