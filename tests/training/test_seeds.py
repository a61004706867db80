"""The one seeding formula reproduces the streams each call site drew before it existed."""

import torch

from anyflow_ray.training.seeds import epoch_seed, step_generator, step_seed


def test_each_site_keeps_the_seed_its_call_site_had():
    seed, step = 7, 123
    base = seed * 1_000_003 + step
    assert step_seed(seed, step, "rank", 3) == base * 1009 + 3
    assert step_seed(seed, step, "sample", 5) == (base * 100_003 + 5) % (2**63 - 1)
    assert step_seed(seed, step, "layout") == base * 10_007 + 17
    assert step_seed(seed, step, "aux") == base * 10_007 + 29
    assert step_seed(seed, step, "rollouts", 2) == base * 64 + 2
    assert epoch_seed(seed, 4) == seed * 7919 + 4 and epoch_seed(seed, 4, rank=2) == (seed * 7919 + 4) * 1009 + 2


def test_sites_and_steps_give_different_streams():
    draws = {(site, step): float(torch.rand((), generator=step_generator(0, step, site))) for site in ("rank", "layout", "aux")
             for step in (0, 1)}
    assert len(set(draws.values())) == len(draws)
