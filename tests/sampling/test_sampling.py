import pytest
import torch

from anyflow_ray.sampling.samplers import consistency_sample, draw_noise, guided_output, sample
from anyflow_ray.sampling.schedule import sampling_grid


class StraightLine(torch.nn.Module):
    """A single-time 'model' whose velocity is exact for data x0 = c (a constant per sample):
    on z_t = (1-t) c + t eps the velocity eps - c = (z - c) / t."""

    def forward(self, z, T, context, return_dict=False):
        t = (T / 1000).reshape(-1, 1, 1, 1, 1)
        target = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return ((z - target) / t.clamp_min(1e-6),)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_euler_on_an_exact_velocity_reaches_the_data_for_any_n(n):
    noise = draw_noise((3, 1, 2, 2, 2), seed=0)
    context = torch.tensor([-1.0, 0.0, 2.0]).reshape(3, 1, 1).expand(3, 4, 6).clone()
    out = sample(StraightLine(), noise, context, n, shift=5.0)
    assert torch.allclose(out, context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1).expand_as(out), atol=1e-4)


def test_sampler_visits_the_shifted_grid():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, z, T, context, return_dict=False):
            seen.append(float(T[0]))
            return (torch.zeros_like(z),)

    sample(Recorder(), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1), 4)
    assert seen == pytest.approx(sampling_grid(4)[:-1].tolist())


def test_guidance_mixes_conditional_and_unconditional():
    class Echo(torch.nn.Module):
        def forward(self, z, T, context, return_dict=False):
            return (z * 0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1),)

    z = torch.zeros(2, 1, 1, 1, 1)
    T = torch.full((2,), 500.0)
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.zeros(1, 3, 4)
    out = guided_output(Echo(), z, T, cond, guidance_scale=3.0, uncond_context=uncond)
    assert torch.allclose(out, torch.full_like(out, 6.0))  # 0 + 3 (2 - 0)
    with pytest.raises(ValueError, match="uncond_context"):
        guided_output(Echo(), z, T, cond, guidance_scale=3.0)


def test_sampling_is_deterministic_given_the_seed(tiny_model_dir):
    from anyflow_ray.models.loading import load_transformer

    model = load_transformer(tiny_model_dir, flow_map=True)
    context = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
    a = sample(model, draw_noise((2, 3, 8, 16, 16), 11), context, 3)
    b = sample(model, draw_noise((2, 3, 8, 16, 16), 11), context, 3)
    c = sample(model, draw_noise((2, 3, 8, 16, 16), 12), context, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noise = draw_noise((2, 3, 8, 16, 16), 11)
    assert torch.equal(consistency_sample(model, noise, context, 3, generator=g1),
                       consistency_sample(model, noise, context, 3, generator=g2))
