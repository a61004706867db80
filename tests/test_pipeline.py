import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from anyflow_ray.data.encode import load_vae, make_tiny_vae
from anyflow_ray.models.loading import (load_text_encoder, load_transformer, make_tiny, text_max_length,
                                        tiny_transformer_config)
from anyflow_ray.pipeline import WAN_SAMPLE_SIZE, AnyFlowRayPipeline, save_as_pipeline

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    tokenizer, encoder = load_text_encoder(tiny_model_dir)
    return AnyFlowRayPipeline(transformer=load_transformer(tiny_model_dir, flow_map=True), text_encoder=encoder,
                           tokenizer=tokenizer, text_max_length=text_max_length(tiny_model_dir),
                           sample_size=[8, 16, 16])


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
    loaded = AnyFlowRayPipeline.from_pretrained(tmp_path / "p")
    assert type(loaded.transformer).__name__ == "WanFlowMapTransformer3DModel"
    assert loaded.config.text_max_length == pipe.config.text_max_length
    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    np.testing.assert_array_equal(pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames,
                                  loaded(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames)


def test_bad_arguments_are_refused(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(PROMPT, num_inference_steps=0)
    with pytest.raises(ValueError, match="height"):
        pipe(PROMPT, height=18)
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPT, output_type="gif")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_prompt_embeds_of_the_wrong_width_name_both_widths(pipe):
    with pytest.raises(ValueError, match=r"16 wide.*32 wide"):
        pipe(prompt_embeds=torch.zeros(1, pipe.config.text_max_length, 16))


def test_frames_height_width_default_to_the_model_size(tiny_cfg, tmp_path):
    base = make_tiny(tmp_path / "base", tiny_cfg.model.tiny, sample_size=(4, 32, 16))
    save_as_pipeline(load_transformer(base, flow_map=True), str(base), str(tmp_path / "p"))
    loaded = AnyFlowRayPipeline.from_pretrained(tmp_path / "p")
    assert loaded.default_sample_size == (4, 32, 16)
    assert loaded(PROMPT, num_inference_steps=1).frames.shape == (1, 4, 32, 16, 3)
    # a pixel-space folder without a size of its own has no sensible default (Wan's would not finish): refused
    sizeless = AnyFlowRayPipeline(transformer=loaded.transformer, text_encoder=loaded.text_encoder,
                               tokenizer=loaded.tokenizer)
    with pytest.raises(ValueError, match="pass num_frames, height and width"):
        sizeless(PROMPT, num_inference_steps=1)
    assert sizeless(PROMPT, num_inference_steps=1, num_frames=4, height=16, width=16).frames.shape == (1, 4, 16, 16, 3)


def test_a_latent_model_pipeline_carries_its_vae_and_returns_pixels(tiny_cfg, tmp_path):
    base = make_tiny(tmp_path / "base", tiny_cfg.model.tiny, channels=4, pixel_space=False, sample_size=(5, 32, 32))
    save_as_pipeline(load_transformer(base, flow_map=True), str(base), str(tmp_path / "p"))
    assert (tmp_path / "p" / "vae" / "config.json").is_file()
    loaded = AnyFlowRayPipeline.from_pretrained(tmp_path / "p")
    out = loaded(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 5, 32, 32, 3)  # decoded by the VAE, not the latents (1, 4, 2, 4, 4)
    # a VAE pipeline without a size of its own (Wan's folders) defaults to WanPipeline's 81 x 480 x 832
    wan_like = AnyFlowRayPipeline(transformer=loaded.transformer, text_encoder=loaded.text_encoder,
                               tokenizer=loaded.tokenizer, vae=loaded.vae)
    assert wan_like.default_sample_size == WAN_SAMPLE_SIZE == (81, 480, 832)


def test_num_videos_per_prompt_keeps_a_prompts_videos_together(pipe):
    prompts = ["a red circle moving left", "a blue square moving up"]
    frames = pipe(prompts, num_inference_steps=1, num_videos_per_prompt=3, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[0] == 6
    single = pipe([prompts[1]], num_inference_steps=1, latents=frames.new_zeros(1, *frames.shape[1:]),
                  output_type="latent").frames
    again = pipe(prompts, num_inference_steps=1, num_videos_per_prompt=3, output_type="latent",
                 latents=frames.new_zeros(frames.shape)).frames
    for k in (3, 4, 5):  # videos 3..5 are the second prompt's
        torch.testing.assert_close(again[k], single[0])


def test_negative_prompt_is_used_only_with_guidance(pipe):
    kw = dict(num_inference_steps=1, generator=None, output_type="latent")
    noise = torch.randn(1, *pipe.latent_shape(1, 8, 16, 16)[1:], generator=torch.Generator().manual_seed(0))
    default = pipe(PROMPT, guidance_scale=3.0, latents=noise, **kw).frames
    explicit = pipe(PROMPT, guidance_scale=3.0, latents=noise, negative_prompt=pipe.config.negative_prompt, **kw).frames
    other = pipe(PROMPT, guidance_scale=3.0, latents=noise, negative_prompt="a blue square moving up", **kw).frames
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, other)
    no_cfg = [pipe(PROMPT, guidance_scale=1.0, latents=noise, negative_prompt=n, **kw).frames for n in ("", "a blue square")]
    torch.testing.assert_close(*no_cfg)
    stored = AnyFlowRayPipeline(transformer=pipe.transformer, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                             text_max_length=pipe.config.text_max_length, negative_prompt="a blue square moving up",
                             sample_size=[8, 16, 16])
    torch.testing.assert_close(stored(PROMPT, guidance_scale=3.0, latents=noise, **kw).frames, other)


def test_wan_vae_decodes_latents_to_video_shapes(pipe):
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    latent_pipe = AnyFlowRayPipeline(transformer=pipe.transformer, text_encoder=pipe.text_encoder,
                                  tokenizer=pipe.tokenizer, vae=vae, text_max_length=pipe.config.text_max_length)
    assert latent_pipe.temporal_factor == vae.config.scale_factor_temporal
    shape = latent_pipe.latent_shape(1, 5, 32, 32)
    assert shape[2] == (5 - 1) // latent_pipe.temporal_factor + 1
    latents = torch.randn(1, 4, shape[2], shape[3], shape[4])
    with torch.no_grad():
        video = latent_pipe.decode(latents)
    assert video.shape[:2] == (1, 3) and video.shape[-2:] == (shape[3] * latent_pipe.spatial_factor,) * 2
    assert 0 <= float(video.min()) and float(video.max()) <= 1


# -- side by side with diffusers' WanPipeline on the same tiny latent model ---------------------------------

@pytest.fixture(scope="module")
def both(tiny_model_dir, tiny_cfg, tmp_path_factory):
    """(AnyFlowRayPipeline, WanPipeline) sharing one tiny teacher transformer, text encoder and tiny Wan VAE."""
    root = tmp_path_factory.mktemp("latent")
    make_tiny_vae(root, z_dim=4)
    vae = load_vae(root)
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**tiny_transformer_config(tiny_cfg.model.tiny, 4)).eval()
    tokenizer, encoder = load_text_encoder(tiny_model_dir)
    ours = AnyFlowRayPipeline(transformer=transformer, text_encoder=encoder, tokenizer=tokenizer, vae=vae,
                           text_max_length=text_max_length(tiny_model_dir))
    theirs = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                         scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    theirs.set_progress_bar_config(disable=True)
    embeds = ours.encode_prompt(["a red circle moving left", "a blue square moving up"])
    return ours, theirs, embeds


SIZE = dict(num_frames=5, height=32, width=32)


def _latents(pipe, batch, seed=0):
    return torch.randn(pipe.latent_shape(batch, 5, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_types_match_wan_pipeline(both, output_type):
    ours, theirs, embeds = both
    # (WanPipeline does not repeat given prompt_embeds for num_videos_per_prompt, so one video per prompt)
    kw = dict(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=1.0, output_type=output_type, **SIZE)
    a = ours(latents=_latents(ours, 2), **kw).frames
    b = theirs(latents=_latents(ours, 2), **kw).frames
    assert type(a) is type(b)
    if output_type == "pil":
        assert [len(clip) for clip in a] == [len(clip) for clip in b] == [5] * 2
        assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for clip in a for im in clip)
        assert [im.size for clip in b for im in clip] == [im.size for clip in a for im in clip]
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    if output_type == "np":
        assert a.shape == (2, 5, 32, 32, 3)
    if output_type == "pt":
        assert a.shape == (2, 5, 3, 32, 32)


def test_one_euler_step_matches_wan_pipeline_with_and_without_guidance(both):
    """One step from T = 1000 to 0 is the same Euler step in both; CFG mixes the same two branches."""
    ours, theirs, embeds = both
    negative = ours.encode_prompt(["a green circle moving down"] * 2)
    for guidance in (1.0, 3.0):
        kw = dict(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=guidance, **SIZE)
        if guidance > 1:
            kw["negative_prompt_embeds"] = negative
        a = ours(latents=_latents(ours, 2), **kw).frames
        b = theirs(latents=_latents(ours, 2), **kw).frames
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prompt_xor_prompt_embeds_is_checked_as_wan_pipeline_does(both):
    ours, theirs, embeds = both
    for pipe in (ours, theirs):
        with pytest.raises(ValueError, match="Cannot forward both `prompt`"):
            pipe(prompt=PROMPT, prompt_embeds=embeds, num_inference_steps=1, **SIZE)
        with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
            pipe(num_inference_steps=1, **SIZE)
        with pytest.raises(ValueError, match="Cannot forward both `negative_prompt`"):
            pipe(prompt_embeds=embeds, negative_prompt="x", negative_prompt_embeds=embeds, num_inference_steps=1, **SIZE)


def test_callback_on_step_end_is_called_per_step_as_wan_pipeline_calls_it(both):
    ours, theirs, embeds = both
    seen = {}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        calls = []

        def callback(p, i, t, kwargs, calls=calls):
            calls.append((p is pipe, i, sorted(kwargs), tuple(kwargs["latents"].shape)))
            return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

        out = pipe(prompt_embeds=embeds, num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                   latents=_latents(ours, 2), callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **SIZE).frames
        assert torch.count_nonzero(out) == 0  # the latents the callback returned replace the pipeline's
        seen[name] = calls
    assert seen["ours"] == seen["theirs"]
    assert [c[1] for c in seen["ours"]] == [0, 1, 2] and all(c[0] for c in seen["ours"])
