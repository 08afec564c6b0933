"""Run under paddle.distributed.launch by tests/test_distributed.py: greedy k-center over this
worker's share of seeded random points; worker 0 writes the chosen indices to argv[1]."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import scaleout  # noqa: E402
from models.patchcore import greedy_k_center  # noqa: E402


def points(n=6000, dim=16):
    """Clusters, so that the pruned phase prunes; a few exact copies, so that ties happen."""
    rng = np.random.RandomState(5)
    x = (rng.randn(30, dim) * 4)[rng.randint(30, size=n)] + rng.randn(n, dim)
    x[100:110] = x[50]
    return x.astype(np.float32)


SETTINGS = dict(per_update=32, n_candidates=200, n_blocks=120)

if __name__ == "__main__":
    group = scaleout.group(timeout=120)
    chosen, radii = greedy_k_center(scaleout.share_of(points(), group), 700, seed=3, group=group, **SETTINGS)
    if group.rank == 0:
        np.save(sys.argv[1], chosen)
