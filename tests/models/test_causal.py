"""The causal flow map (docs/method.md §6): block-causal attention, teacher forcing, the KV cache, loading."""

import pytest
import torch
from omegaconf import OmegaConf

from anyflow_ray.run.config import ConfigError, TinyModelConfig
from anyflow_ray.models.architectures import tiny_transformer_config
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel, is_causal
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel, is_flow_map
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.models.lora import apply_lora

CHUNKS = [2, 2, 2, 2]  # 8 latent frames, as configs/tiny.yaml's data


@pytest.fixture(scope="module")
def flow():
    """A two-layer tiny flow map with random, non-trivial weights (a fresh Wan zeroes some projections)."""
    torch.manual_seed(0)
    model = WanFlowMapTransformer3DModel(**tiny_transformer_config(TinyModelConfig(num_layers=2), channels=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def causal(flow):
    return WanCausalFlowMapTransformer3DModel.from_base(flow, CHUNKS).eval()


def _inputs(frames=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, frames, 16, 16, generator=g)
    clean = torch.randn(2, 3, frames, 16, 16, generator=g)
    T = torch.rand(2, len(CHUNKS), generator=g) * 1000
    context = torch.randn(2, 12, 32, generator=g)
    return z, clean, T, 0.4 * T, context


@torch.no_grad()
def test_a_later_chunk_never_changes_an_earlier_one(causal):
    z, _, T, R, context = _inputs()
    before = causal(z, T, context, timestep_r=R).sample
    changed = z.clone()
    changed[:, :, 4:] += torch.randn_like(changed[:, :, 4:])  # chunks 2 and 3
    later = T.clone()
    later[:, 3] = 999.0
    after = causal(changed, later, context, timestep_r=R).sample
    assert torch.equal(after[:, :, :4], before[:, :, :4])
    assert not torch.allclose(after[:, :, 4:6], before[:, :, 4:6])
    # the same holds for teacher forcing, for the noisy and the clean copy of later chunks
    _, clean, _, _, _ = _inputs(seed=1)
    tf = causal(z, T, context, timestep_r=R, clean_states=clean).sample
    clean2 = clean.clone()
    clean2[:, :, 4:] += 1.0
    tf2 = causal(changed, T, context, timestep_r=R, clean_states=clean2).sample
    assert torch.equal(tf2[:, :, :4], tf[:, :, :4])


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_one_chunk_over_all_frames_is_the_bidirectional_flow_map(flow, seed):
    z, _, T, R, context = _inputs(seed=seed)
    one = WanCausalFlowMapTransformer3DModel.from_base(flow, [8]).eval()
    expected = flow(z, T[:, 0], context, timestep_r=R[:, 0]).sample
    assert torch.equal(one(z, T[:, 0], context, timestep_r=R[:, 0]).sample, expected)
    assert torch.equal(one(z, T[:, :1], context, timestep_r=R[:, :1]).sample, expected)  # (B, 1) times
    # the causal model differs from it: later chunks do not see the whole clip
    assert not torch.allclose(WanCausalFlowMapTransformer3DModel.from_base(flow, CHUNKS)(
        z, T[:, 0], context, timestep_r=R[:, 0]).sample, expected)


@torch.no_grad()
def test_kv_cache_path_equals_the_masked_forward(causal):
    """Chunks 0-2 clean (at T = R = 0 in the plain call, in the cache for the cached one), chunk 3 noisy."""
    z, clean, T, R, context = _inputs()
    times_T, times_R = torch.zeros_like(T), torch.zeros_like(R)
    times_T[:, 3], times_R[:, 3] = T[:, 3], R[:, 3]
    inputs = torch.cat([clean[:, :, :6], z[:, :, 6:]], dim=2)
    plain = causal(inputs, times_T, context, timestep_r=times_R).sample

    cache = causal.new_cache()
    causal.append_to_cache(cache, clean[:, :, :2], context)
    first = causal(z[:, :, 2:4], T[:, 1], context, timestep_r=R[:, 1], kv_cache=cache).sample  # reads chunk 0
    fused = causal(z[:, :, 4:6], T[:, 2], context, timestep_r=R[:, 2], kv_cache=cache,
                   cache_states=clean[:, :, 2:4]).sample  # encodes chunk 1 in the same call
    assert (cache.frames, cache.chunks, len(cache)) == (4, 2, 2)
    causal.append_to_cache(cache, clean[:, :, 4:6], context)
    last = causal(z[:, :, 6:], T[:, 3], context, timestep_r=R[:, 3], kv_cache=cache).sample
    torch.testing.assert_close(last, plain[:, :, 6:], atol=1e-5, rtol=1e-5)

    # the cached calls against plain calls on prefixes of the same clip
    for out, chunk in ((first, 1), (fused, 2)):
        prefix = torch.cat([clean[:, :, :2 * chunk], z[:, :, 2 * chunk:2 * chunk + 2]], dim=2)
        t_T, t_R = torch.zeros(2, chunk + 1), torch.zeros(2, chunk + 1)
        t_T[:, chunk], t_R[:, chunk] = T[:, chunk], R[:, chunk]
        torch.testing.assert_close(out, causal(prefix, t_T, context, timestep_r=t_R).sample[:, :, -2:],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_teacher_forcing_chunk_j_equals_the_cache_path_with_clean_context(causal):
    z, clean, T, R, context = _inputs(seed=2)
    tf = causal(z, T, context, timestep_r=R, clean_states=clean).sample
    assert tf.shape == z.shape
    for j in range(len(CHUNKS)):
        cache = causal.new_cache()
        if j:
            causal.append_to_cache(cache, clean[:, :, :2 * j], context)
        out = causal(z[:, :, 2 * j:2 * j + 2], T[:, j], context, timestep_r=R[:, j], kv_cache=cache).sample
        torch.testing.assert_close(out, tf[:, :, 2 * j:2 * j + 2], atol=1e-5, rtol=1e-5)
    # chunk 0 sees no context; later ones see the clean copy, not their own noisy past
    plain = causal(z, T, context, timestep_r=R).sample
    torch.testing.assert_close(tf[:, :, :2], plain[:, :, :2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tf[:, :, 2:], plain[:, :, 2:], atol=1e-3)


@torch.no_grad()
def test_rolling_trim_streams_past_the_training_length(causal):
    z, clean, T, R, context = _inputs(frames=16)  # twice the training length
    assert causal.chunk_bounds(16)[-1] == (14, 16) and len(causal.chunk_bounds(16)) == 8
    assert causal.chunk_bounds(5) == [(0, 2), (2, 4), (4, 5)]

    def stream(window: int) -> list[torch.Tensor]:
        cache, outputs = causal.new_cache(), []
        for j in range(8):
            if window:  # as causal_sample: room for the chunk encoded in this same call
                cache.trim(window - 1 if j else window)
            outputs.append(causal(z[:, :, 2 * j:2 * j + 2], T[:, 0], context, timestep_r=R[:, 0], kv_cache=cache,
                                  cache_states=clean[:, :, 2 * j - 2:2 * j] if j else None).sample)
            assert len(cache) == (min(j, window) if window else j) and cache.frames == cache.chunks * 2 == 2 * j
        return outputs

    full, rolled = stream(0), stream(2)
    assert all(torch.isfinite(out).all() for out in rolled)
    assert all(torch.equal(full[j], rolled[j]) for j in range(3))  # the window is not full yet
    assert not torch.allclose(full[7], rolled[7], atol=1e-4)  # chunk 7 no longer reads chunks 0-4
    cache = causal.new_cache()
    causal.append_to_cache(cache, clean[:, :, :4], context)
    cache.trim(0)
    assert (len(cache), cache.tokens, cache.frames, cache.chunks) == (0, 0, 4, 2)


def test_teacher_forcing_trains_lora_and_its_clean_copy_is_not_in_the_loss(flow):
    causal = WanCausalFlowMapTransformer3DModel.from_base(flow, CHUNKS)
    apply_lora(causal, OmegaConf.create({"rank": 4, "alpha": 4, "flow_map_targets": [],
                                         "target_modules": ["attn1.to_q", "attn1.to_k", "attn1.to_v",
                                                            "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]}))
    causal.enable_gradient_checkpointing()
    causal.train()
    z, clean, T, R, context = _inputs()
    clean.requires_grad_(True)
    z.requires_grad_(True)
    out = causal(z, T, context, timestep_r=R, clean_states=clean).sample
    out[:, :, :2].pow(2).mean().backward()  # chunk 0 only: it reads no clean chunk
    trainable = [(n, p) for n, p in causal.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)
    assert clean.grad is None or clean.grad.abs().sum() == 0
    assert z.grad[:, :, :2].abs().sum() > 0 and z.grad[:, :, 2:].abs().sum() == 0


def test_save_load_and_load_transformer_pick_the_causal_class(causal, flow, tmp_path):
    causal.save_pretrained(tmp_path / "causal")
    loaded = load_transformer(tmp_path / "causal", flow_map=True)
    assert type(loaded) is WanCausalFlowMapTransformer3DModel and loaded.config.causal_chunks == CHUNKS
    assert is_causal(loaded) and is_flow_map(loaded) and not is_causal(flow)
    z, clean, T, R, context = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(z, T, context, timestep_r=R, clean_states=clean).sample,
                           causal(z, T, context, timestep_r=R, clean_states=clean).sample)
    rechunked = load_transformer(tmp_path / "causal", flow_map=True, causal_chunks=[4, 4])
    assert rechunked.config.causal_chunks == [4, 4]
    flow.save_pretrained(tmp_path / "flow")
    assert load_transformer(tmp_path / "flow", flow_map=True, causal_chunks=CHUNKS).config.causal_chunks == CHUNKS
    assert type(load_transformer(tmp_path / "flow", flow_map=True)) is WanFlowMapTransformer3DModel


def test_bad_chunks_and_times_are_refused(flow, causal):
    with pytest.raises(ConfigError, match="model.causal.chunks"):
        WanCausalFlowMapTransformer3DModel.from_base(flow, [])
    z, _, T, R, context = _inputs()
    with pytest.raises(ValueError, match=r"timestep of shape \(2, 3\)"):
        causal(z, T[:, :3], context)
    with pytest.raises(ValueError, match="chunk boundary"):
        causal(z[:, :, :2], T[:, 0], context, kv_cache=causal.new_cache(), cache_states=z[:, :, :1])
