"""Causal backward simulation (docs/method.md §5, §6) on the tiny causal flow map: calls per chunk, the
learner's teacher-forced re-run against the actor's chunk-by-chunk rollout, and gradients."""

import pytest
import torch

from anyflow_ray.sampling.rollouts import causal_finish, causal_prefix, causal_rollout
from anyflow_ray.sampling.samplers import causal_sample
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.loading import load_transformer

CHUNKS = [2, 2, 2, 2]


@pytest.fixture(scope="module")
def causal_model(tiny_model_dir):
    model = WanCausalFlowMapTransformer3DModel.from_base(load_transformer(tiny_model_dir), CHUNKS)
    torch.manual_seed(1)
    with torch.no_grad():  # random, non-trivial weights (a fresh Wan init zeroes some projections)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 16, 16, generator=g), torch.randn(batch, 12, 32, generator=g)


class CallLog:
    """Records each forward call of the model: the first latent frame of the chunk it computes (after the
    cache and the re-encoded previous chunk), whether it re-encoded one, and whether it was teacher forced."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        cache, reencoded = kwargs.get("kv_cache"), kwargs.get("cache_states")
        first = (cache.frames if cache is not None else 0) + (reencoded.shape[2] if reencoded is not None else 0)
        self.calls.append((first, reencoded is not None, kwargs.get("clean_states") is not None))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_at_most_three_calls_per_chunk_for_every_k_and_the_cache_holds_the_chunks_before(causal_model, n):
    noise, context = _inputs()
    starts = [start for start, _ in causal_model.chunk_bounds(8)]
    for k in range(n):
        log = CallLog(causal_model)
        try:
            rollout = causal_rollout(causal_model, noise, context, n, k)
        finally:
            log.close()
        per_chunk = {s: [c for c in log.calls if c[0] == s] for s in starts}
        assert sum(map(len, per_chunk.values())) == len(log.calls)  # every call computes one chunk in order
        expected = (1 if k == 0 else 2) + (0 if k == n - 1 else 1)
        assert [len(calls) for calls in per_chunk.values()] == [expected] * len(starts), (n, k)
        assert max(map(len, per_chunk.values())) <= 3
        # chunk j's first call re-encodes chunk j-1 into the cache (fused); nothing after the last chunk
        assert [[c[1] for c in per_chunk[s]] for s in starts] == \
            [[False] * expected] + [[True] + [False] * (expected - 1)] * (len(starts) - 1)
        assert [c[0] for c in log.calls] == sorted(c[0] for c in log.calls)
        assert rollout.state.z_k.shape == rollout.x_hat.shape == noise.shape
        assert (rollout.state.num_steps, rollout.state.k) == (n, k)


@pytest.mark.parametrize("n, k", [(1, 0), (2, 0), (2, 1), (4, 2), (8, 7), (16, 5)])
def test_the_learners_teacher_forced_rerun_equals_the_actors_rollout(causal_model, n, k):
    noise, context = _inputs(seed=n + k)
    rollout = causal_rollout(causal_model, noise, context, n, k)
    log = CallLog(causal_model)
    try:
        with torch.no_grad():
            z_next, x_hat = causal_finish(causal_model, rollout.state, rollout.x_hat, context)
            state = causal_prefix(causal_model, noise, rollout.x_hat, context, n, k)  # grad_scope: all
    finally:
        log.close()
    assert torch.allclose(x_hat, rollout.x_hat, atol=1e-5, rtol=1e-4), (x_hat - rollout.x_hat).abs().max()
    assert torch.allclose(state.z_k, rollout.state.z_k, atol=1e-5, rtol=1e-4)
    # all chunks at once: two calls for the re-run (one when k = N - 1), one for the prefix (none when k = 0)
    assert len(log.calls) == (1 if k == n - 1 else 2) + (0 if k == 0 else 1)
    assert all(forced for _, _, forced in log.calls)
    if k == n - 1:
        assert torch.equal(z_next, x_hat)
    assert not torch.allclose(rollout.x_hat[:, :, :2], rollout.x_hat[:, :, 2:4])  # chunks differ: not trivial


@pytest.mark.parametrize("n", [1, 2])
def test_with_k_last_the_rollout_is_the_causal_n_step_sampler(causal_model, n):
    """For N <= 2 and k = N - 1 the backward simulation runs exactly the N jumps of the sampler per chunk."""
    noise, context = _inputs(seed=7)
    rollout = causal_rollout(causal_model, noise, context, n, n - 1)
    expected = causal_sample(causal_model, noise, context, n)
    assert torch.allclose(rollout.x_hat, expected, atol=1e-5, rtol=1e-4)


def test_uniform_calls_make_the_same_calls_for_every_k_and_change_nothing(causal_model):
    noise, context = _inputs(seed=3)
    for n, k in [(4, 0), (4, 3)]:
        rollout = causal_rollout(causal_model, noise, context, n, k)
        log = CallLog(causal_model)
        try:
            with torch.no_grad():
                state = causal_prefix(causal_model, noise, rollout.x_hat, context, n, k, uniform_calls=True)
                x_hat = causal_finish(causal_model, state, rollout.x_hat, context, uniform_calls=True)[1]
        finally:
            log.close()
        assert len(log.calls) == 3
        assert torch.allclose(x_hat, rollout.x_hat, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_the_weights_through_every_chunk_and_never_the_context(causal_model):
    noise, context = _inputs(seed=5)
    rollout = causal_rollout(causal_model, noise, context, 4, 1)
    clean = rollout.x_hat.clone().requires_grad_(True)
    causal_model.zero_grad()
    z_k = rollout.state.z_k.clone().requires_grad_(True)
    state = type(rollout.state)(4, 1, rollout.state.T_k, rollout.state.T_next, z_k)
    x_hat = causal_finish(causal_model, state, clean, context)[1]
    x_hat.square().sum().backward()
    assert clean.grad is None  # the context is the actor's detached output
    assert all(z_k.grad[:, :, s:e].abs().sum() > 0 for s, e in causal_model.chunk_bounds(8))
    grads = [p.grad for p in causal_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    causal_model.zero_grad()
