"""FAR's compressed context against diffusers' own ``AnyFlowFARTransformer3DModel`` and ``AnyFlowFARPipeline``.

Tiny fp32 models: 4 chunks of 2 latent frames with ``full_chunk_limit=2``, so teacher forcing compresses
the oldest 2 chunks and sampling compresses ever more of the finished ones. 16 x 16 latents make every
chunk 128 tokens: diffusers' FAR attention pads its sequence to a multiple of 128 and, on its KV-cache
path, attends to the zero padding (no mask there), which shifts its outputs at other sizes.
"""

import json

import pytest
import torch
from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, FlowMapEulerDiscreteScheduler

from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.far_context import far_patch_weights
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.sampling.samplers import causal_sample

CHUNKS, LIMIT = [2, 2, 2, 2], 2
B, C, F, H, W = 1, 4, 8, 16, 16
TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers' FAR model, the same weights loaded by the project) with every weight perturbed."""
    torch.manual_seed(0)
    theirs = AnyFlowFARTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
                                          text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                          full_chunk_limit=LIMIT, chunk_partition=tuple(CHUNKS)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("far") / "transformer"
    theirs.save_pretrained(folder)
    ours = load_transformer(folder, flow_map=True).eval()
    return theirs, ours


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g), torch.randn(B, 5, 32,
                                                                                                          generator=g)


def test_the_project_reads_diffusers_far_model_and_writes_one_diffusers_loads_strictly(pair, tmp_path):
    theirs, ours = pair
    assert type(ours) is WanCausalFlowMapTransformer3DModel
    assert ours.config.causal_chunks == CHUNKS and ours.config.full_chunk_limit == LIMIT
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AnyFlowFARTransformer3DModel" and config["chunk_partition"] == CHUNKS
    again, info = AnyFlowFARTransformer3DModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(again.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_the_compressed_patch_embedding_starts_as_diffusers_warm_start():
    torch.manual_seed(4)
    fresh = AnyFlowFARTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
                                         text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, full_chunk_limit=LIMIT)
    weight, bias = far_patch_weights(fresh.patch_embedding.weight, fresh.patch_embedding.bias, (1, 4, 4))
    assert torch.allclose(weight, fresh.far_patch_embedding.weight, atol=1e-7)
    assert torch.equal(bias, fresh.far_patch_embedding.bias)


def test_teacher_forcing_over_compressed_old_chunks_matches_diffusers(pair):
    theirs, ours = pair
    noisy, clean, context = _data()
    T = torch.tensor([[0.0, 0.0, 700.0, 300.0]])  # the 2 oldest chunks: compressed clean context
    R = 0.5 * T
    given = noisy.clone()
    given[:, :, :4] = clean[:, :, :4]  # diffusers reads the context from its input at t = 0
    with torch.no_grad():
        expected = theirs(given.permute(0, 2, 1, 3, 4), T.repeat_interleave(2, 1), R.repeat_interleave(2, 1), context,
                          chunk_partition=CHUNKS, clean_hidden_states=clean[:, :, 4:].permute(0, 2, 1, 3, 4),
                          clean_timestep=torch.zeros(B, 4), return_dict=False)[0].permute(0, 2, 1, 3, 4)
        got = ours(noisy, T, context, timestep_r=R, clean_states=clean, return_dict=False)[0]
    assert torch.equal(got[:, :, :4], torch.zeros_like(got[:, :, :4]))  # compressed context: no output
    assert (got[:, :, 4:] - expected).abs().max() < TOL
    # within the limit nothing is compressed: the plain causal model's teacher forcing
    with torch.no_grad():
        two = ours(noisy[:, :, :4], T[:, 2:], context, timestep_r=R[:, 2:], clean_states=clean[:, :, :4]).sample
        plain = WanCausalFlowMapTransformer3DModel.from_base(ours, CHUNKS[:2]).eval()
        plain.register_to_config(full_chunk_limit=None)
        assert torch.equal(two, plain(noisy[:, :, :4], T[:, 2:], context, timestep_r=R[:, 2:],
                                      clean_states=clean[:, :, :4]).sample)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampling_on_the_kv_cache_matches_diffusers_far_pipeline(pair, steps):
    """The project re-encodes the finished chunks (the oldest compressed) inside each chunk's first call;
    diffusers' pipeline in a cache step of its own: the same latents."""
    theirs, ours = pair
    noise, _, context = _data(seed=2)
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=theirs, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=context, latents=noise.clone(), num_inference_steps=steps, output_type="latent",
                    height=8 * H, width=8 * W, chunk_partition=CHUNKS).frames
    got = causal_sample(ours, noise.clone(), context, steps, shift=5.0)
    assert (got - expected).abs().max() < TOL
    # video-to-video: the first 2 chunks given, encoded into the cache at once
    video = torch.randn(B, C, 4, H, W, generator=torch.Generator().manual_seed(3))
    expected = pipe(prompt_embeds=context, latents=noise.clone(), num_inference_steps=steps, output_type="latent",
                    height=8 * H, width=8 * W, chunk_partition=CHUNKS,
                    video_latents=video.permute(0, 2, 1, 3, 4)).frames
    got = causal_sample(ours, noise.clone(), context, steps, shift=5.0, fixed=video)
    assert (got - expected).abs().max() < TOL


def test_calls_the_compressed_context_does_not_define_are_refused(pair):
    _, ours = pair
    noisy, clean, context = _data()
    with pytest.raises(ValueError, match="read from clean_states"):
        ours(noisy, torch.tensor([500.0]), context)
    with pytest.raises(ValueError, match="oldest 2 of 4 chunks are compressed clean context"):
        ours(noisy, torch.tensor([[100.0, 0.0, 700.0, 300.0]]), context, clean_states=clean)
