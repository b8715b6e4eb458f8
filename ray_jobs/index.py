"""Retrieval index build as a Ray job: encoder actors on Ray Data.

    ray job submit --working-dir . -- python -m ray_jobs.index --config default \
        retrieval.enabled=true retrieval.method=dense retrieval.encode_replicas=2
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("index"))
