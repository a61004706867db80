"""Chunk-by-chunk sampling of the causal flow map (docs/method.md §6): call counts, I2V/V2V, streaming,
the pipeline and the CLI's ``--image``."""

import numpy as np
import PIL.Image
import pytest
import torch

from anyflow_ray.sampling.samplers import causal_sample
from anyflow_ray.cli import main
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.pipeline import AnyFlowRayPipeline, save_as_pipeline
from anyflow_ray.sampling.samplers import sample

CHUNKS = [2, 2, 2, 2]
PROMPT = "a red circle moving left"
SIZE = dict(height=16, width=16)  # the tiny base stores no video size (the pipeline would default to Wan's)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, tiny_model_dir):
    """A causal pipeline folder on the tiny base, with random non-trivial weights."""
    model = load_transformer(tiny_model_dir, flow_map=True, causal_chunks=CHUNKS)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_as_pipeline(model, str(tiny_model_dir), str(tmp_path_factory.mktemp("causal") / "pipe"))


@pytest.fixture(scope="module")
def model(causal_dir):
    """The saved-and-reloaded transformer, counting its network calls (one text projection per call)."""
    loaded = load_transformer(causal_dir, flow_map=True).eval()
    loaded.calls = 0

    def count(*_):
        loaded.calls += 1

    loaded.condition_embedder.text_embedder.register_forward_hook(count)
    return loaded


def _noise(frames=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, frames, 16, 16, generator=g), torch.randn(2, 12, 32, generator=g)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_n_calls_per_chunk_with_the_re_encode_fused(model, steps):
    noise, context = _noise()
    finished = []
    model.calls = 0
    out = causal_sample(model, noise, context, steps, on_chunk=lambda j, chunk: finished.append((j, chunk.clone())))
    assert model.calls == steps * len(CHUNKS)  # no separate re-encode call
    assert [j for j, _ in finished] == [0, 1, 2, 3]
    assert torch.equal(torch.cat([chunk for _, chunk in finished], dim=2), out)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_t2v_i2v_v2v_from_one_checkpoint_keep_the_fixed_frames(model):
    noise, context = _noise()
    t2v = causal_sample(model, noise, context, 2)
    image = torch.rand(2, 3, 1, 16, 16) * 2 - 1  # one frame: ends inside chunk 0
    model.calls = 0
    i2v = causal_sample(model, noise, context, 2, fixed=image)
    assert model.calls == 2 * len(CHUNKS)  # chunk 0 is still sampled, around its fixed frame
    assert torch.equal(i2v[:, :, :1], image)
    clip = torch.rand(2, 3, 4, 16, 16) * 2 - 1  # two whole chunks
    model.calls = 0
    v2v = causal_sample(model, noise, context, 2, fixed=clip)
    assert model.calls == 1 + 2 * 2  # one call encodes the context, then two chunks of two steps
    assert torch.equal(v2v[:, :, :4], clip)
    # the conditioning changes what follows it; T2V's chunk 0 is not the image
    assert not torch.allclose(i2v[:, :, 1:], t2v[:, :, 1:]) and not torch.allclose(v2v[:, :, 4:], t2v[:, :, 4:])


def test_streaming_past_the_training_length_with_a_rolling_cache(model):
    noise, context = _noise(frames=16)  # 8 chunks, twice the training length
    model.calls = 0
    window = causal_sample(model, noise, context, 2, cache_chunks=2)
    assert model.calls == 2 * 8 and window.shape == noise.shape and torch.isfinite(window).all()
    full = causal_sample(model, noise, context, 2)
    assert torch.equal(window[:, :, :6], full[:, :, :6])  # the window only bites from chunk 3 on
    assert not torch.allclose(window[:, :, 14:], full[:, :, 14:])


def test_one_chunk_and_guidance_match_the_bidirectional_sampler(tiny_model_dir):
    flow = load_transformer(tiny_model_dir, flow_map=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    one = WanCausalFlowMapTransformer3DModel.from_base(flow, [8])
    noise, context = _noise()
    uncond = torch.zeros(1, 12, 32)
    assert torch.equal(causal_sample(one, noise, context, 3), sample(flow, noise, context, 3))
    torch.testing.assert_close(causal_sample(one, noise, context, 2, guidance_scale=3.0, uncond_context=uncond),
                               sample(flow, noise, context, 2, guidance_scale=3.0, uncond_context=uncond))


def test_pipeline_samples_the_causal_folder_for_any_n_and_twice_the_length(causal_dir):
    pipe = AnyFlowRayPipeline.from_pretrained(causal_dir)
    assert type(pipe.transformer) is WanCausalFlowMapTransformer3DModel
    for steps in (1, 2, 4):
        frames = pipe(PROMPT, num_inference_steps=steps, num_frames=8, generator=torch.Generator().manual_seed(0),
                      **SIZE).frames
        assert frames.shape == (1, 8, 16, 16, 3) and 0 <= frames.min() and frames.max() <= 1
    streamed = []
    long = pipe(PROMPT, num_inference_steps=2, num_frames=16, cache_chunks=2, **SIZE,
                callback_on_chunk_end=lambda p, j, f: streamed.append(f), generator=torch.Generator().manual_seed(0))
    assert long.frames.shape == (1, 16, 16, 16, 3) and len(streamed) == 8
    np.testing.assert_array_equal(np.concatenate(streamed, axis=1), long.frames)  # written as made = the result
    image = PIL.Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))  # resized to 16 x 16
    i2v = pipe(PROMPT, num_inference_steps=2, num_frames=8, image=image, generator=torch.Generator().manual_seed(0),
               **SIZE).frames
    np.testing.assert_allclose(i2v[0, 0], 200 / 255, atol=1e-6)
    clip = long.frames[0, :4]  # (F, H, W, 3) in [0, 1]: continue the first four frames
    v2v = pipe(PROMPT, num_inference_steps=2, num_frames=8, video=clip, generator=torch.Generator().manual_seed(1),
               **SIZE).frames
    np.testing.assert_allclose(v2v[0, :4], clip, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, image=image, video=clip, num_frames=8, **SIZE)


def test_cli_samples_from_an_image(causal_dir, tmp_path):
    PIL.Image.fromarray(np.full((16, 16, 3), 30, dtype=np.uint8)).save(tmp_path / "start.png")
    args = ["--config", "configs/tiny.yaml", f"run.output_dir={tmp_path}", f"sample.models=[{causal_dir}]",
            "sample.steps=[2]", f'sample.prompts=["{PROMPT}"]', "sample.max_chunks=6", "model.causal.cache_chunks=3"]
    assert main(["sample", "--image", str(tmp_path / "start.png"), *args]) == 0
    out = tmp_path / "samples" / "pipe"
    assert (out / "a_red_circle_moving_left_2steps.gif").is_file() and (out / "contact_sheet.png").is_file()
    import imageio.v2 as imageio

    with imageio.get_reader(out / "a_red_circle_moving_left_2steps.mp4") as reader:
        frames = [frame for frame in reader]
    assert len(frames) == 12  # six chunks of two frames, streamed into the MP4
    assert abs(int(frames[0][40, 40, 0]) - 30) <= 3  # the first frame is the image (codec tolerance)
    assert main(["sample", "--image", str(tmp_path / "missing.png"), *args]) == 2
