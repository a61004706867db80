import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from anyflow_ray.models.loading import load_text_encoder, load_transformer, text_max_length
from anyflow_ray.pipeline import AnyFlowPipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    tokenizer, encoder = load_text_encoder(tiny_model_dir)
    return AnyFlowPipeline(transformer=load_transformer(tiny_model_dir, flow_map=True), text_encoder=encoder,
                           tokenizer=tokenizer, text_max_length=text_max_length(tiny_model_dir))


@pytest.mark.parametrize("steps", [1, 3])
def test_call_returns_frames_and_is_seeded(pipe, steps):
    prompts = ["a red circle moving left", "a blue square moving up"]
    a = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames
    b = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames
    assert a.shape == (2, 8, 16, 16, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)


def test_save_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = AnyFlowPipeline.from_pretrained(tmp_path / "p")
    assert type(loaded.transformer).__name__ == "WanFlowMapTransformer3DModel"
    assert loaded.config.text_max_length == pipe.config.text_max_length
    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    np.testing.assert_array_equal(pipe("a red circle moving left", generator=torch.Generator().manual_seed(1), **kw).frames,
                                  loaded("a red circle moving left", generator=torch.Generator().manual_seed(1), **kw).frames)


def test_bad_arguments_are_refused(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a red circle moving left", num_inference_steps=0)
    with pytest.raises(ValueError, match="height"):
        pipe("a red circle moving left", height=18)


def test_wan_vae_decodes_latents_to_video_shapes(pipe):
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    latent_pipe = AnyFlowPipeline(transformer=pipe.transformer, text_encoder=pipe.text_encoder,
                                  tokenizer=pipe.tokenizer, vae=vae, text_max_length=pipe.config.text_max_length)
    assert latent_pipe.temporal_factor == vae.config.scale_factor_temporal
    shape = latent_pipe.latent_shape(1, 5, 32, 32)
    assert shape[2] == (5 - 1) // latent_pipe.temporal_factor + 1
    latents = torch.randn(1, 4, shape[2], shape[3], shape[4])
    with torch.no_grad():
        video = latent_pipe.decode(latents)
    assert video.shape[:2] == (1, 3) and video.shape[-2:] == (shape[3] * latent_pipe.spatial_factor,) * 2
    assert 0 <= float(video.min()) and float(video.max()) <= 1
