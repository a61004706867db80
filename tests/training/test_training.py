"""EMA warm-up: a plain copy of the weights for the first N updates, then the decay; resumable."""

import torch

from anyflow_ray.training.optim import EMA


def test_ema_copies_during_warmup_then_decays_and_resumes_its_count():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, warmup=2)
    for value in (1.0, 2.0):
        p.data.fill_(value)
        ema.update()
        assert torch.equal(ema.shadow[0], torch.full((3,), value))  # warm-up: a copy
    p.data.fill_(12.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9 * 2.0 + 0.1 * 12.0))
    resumed = EMA([p], decay=0.9, warmup=2)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == 3 and torch.equal(resumed.shadow[0], ema.shadow[0])


def test_ema_without_warmup_decays_from_the_first_update():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([p], decay=0.5)
    p.data.fill_(4.0)
    ema.update()
    assert torch.equal(ema.shadow[0], torch.full((2,), 2.0))


def test_ema_averages_the_local_part_of_a_parameter():
    """``local``: the EMA averages the tensor a rank holds (under ZeRO-3 its partition), not the parameter."""
    p = torch.nn.Parameter(torch.zeros(0))  # a partitioned parameter's placeholder
    part = torch.zeros(3)
    ema = EMA([p], decay=0.5, local=lambda _: part)
    assert ema.shadow[0].shape == (3,)
    part.fill_(4.0)
    ema.update()
    assert torch.equal(ema.shadow[0], torch.full((3,), 2.0))
