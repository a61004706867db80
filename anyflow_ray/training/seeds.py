"""Every random stream of a training run, as a function of (run seed, step, site): one formula.

A run is reproducible and resumable because nothing random depends on history: the draws of step s at
a site (a rank's noise, a sample's times, the rollouts' seeds, ...) are seeded by (run.seed, s, site)
alone. Each site keeps the multiplier and tag it had when the formula was written at its call site, so
the streams (and the demo's figures) are unchanged:

    seed(step)       = run_seed * 1_000_003 + step
    site "rank":     seed(step) * 1009 + rank           a rank's own draws of the step (noise, times)
    site "sample":   seed(step) * 100_003 + position    one sample of the global batch, on any rank
    site "layout":   seed(step) * 10_007 + 17           the causal chunk layout (every rank alike)
    site "aux":      seed(step) * 10_007 + 29           whether the causal step adds a bidirectional one
    site "rollouts": seed(step) * 64 + i                the i-th rollout of the step (<= 64 a step)

Epoch permutations of the data set use ``epoch_seed`` (global, or a rank's own part).
"""

from __future__ import annotations

import torch

STEP_PRIME = 1_000_003
EPOCH_PRIME = 7919
RANK_PRIME = 1009
SEED_MODULUS = 2**63 - 1
# site -> (multiplier, fixed tag or None: the caller's index)
SITES = {"rank": (RANK_PRIME, None), "sample": (100_003, None), "layout": (10_007, 17), "aux": (10_007, 29),
         "rollouts": (64, None)}


def step_seed(run_seed: int, step: int, site: str, index: int = 0) -> int:
    """The seed of draw ``index`` at ``site`` in step ``step`` (see the module docstring)."""
    multiplier, tag = SITES[site]
    return ((run_seed * STEP_PRIME + step) * multiplier + (index if tag is None else tag)) % SEED_MODULUS


def step_generator(run_seed: int, step: int, site: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``step_seed`` (draws made on the CPU reproduce on any device)."""
    return torch.Generator().manual_seed(step_seed(run_seed, step, site, index))


def epoch_seed(run_seed: int, epoch: int, rank: int | None = None) -> int:
    """The seed of an epoch's permutation: of the whole data set, or of ``rank``'s own part of it."""
    seed = run_seed * EPOCH_PRIME + epoch
    return seed if rank is None else seed * RANK_PRIME + rank
