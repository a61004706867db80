"""Exports diffusers loads, and diffusers' folders the project loads (tiny latent model, CPU).

The project's sampler and diffusers' ``AnyFlowPipeline`` take the same shifted grid and the same jumps;
in fp32 they differ only in the rounding of the time mix (measured below 1e-6 on the latents).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AnyFlowPipeline, DiffusionPipeline, WanPipeline

from anyflow_ray.formats import FolderError, open_folder
from anyflow_ray.models.loading import load_transformer, make_tiny, text_max_length
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.run.config import load_config
from anyflow_ray.training.export import write_pipeline
from tests.probes import reference_layout

PROMPTS = ["a red circle moving left", "a blue square moving up"]
SIZE = dict(num_frames=5, height=32, width=32)
TOL = 1e-5  # fp32 latents after N flow-map jumps


@pytest.fixture(scope="module")
def latent(tmp_path_factory, tiny_cfg):
    """(cfg, exported student folder, the student) on a tiny latent base (4 channels, a tiny Wan VAE)."""
    root = tmp_path_factory.mktemp("formats")
    base = make_tiny(root / "base", tiny_cfg.model.tiny, channels=4, pixel_space=False, sample_size=(5, 32, 32))
    cfg = load_config(None, ["model.tiny.num_layers=2", "model.tiny.ffn_dim=64", f"model.base={base}"])
    student = load_transformer(base, flow_map=True)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = write_pipeline(student.eval(), cfg, root / "student", torch.float32, step=7)
    return cfg, out, student


def _noise(batch=2, seed=0):
    return torch.randn(batch, 4, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def _diffusers_latents(pipe, folder, steps, seed=0, **kw):
    return pipe(PROMPTS, num_inference_steps=steps, latents=_noise(seed=seed), output_type="latent",
                max_sequence_length=text_max_length(folder), **SIZE, **kw).frames


def test_diffusers_own_pipeline_samples_an_export_as_the_project_does(latent):
    cfg, out, _ = latent
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowPipeline" and index["scheduler"][1] == "FlowMapEulerDiscreteScheduler"
    theirs = DiffusionPipeline.from_pretrained(out)
    assert type(theirs) is AnyFlowPipeline and theirs.scheduler.config.shift == cfg.schedule.shift
    theirs.set_progress_bar_config(disable=True)
    ours = AnyFlowRayPipeline.from_pretrained(out)
    for steps in (1, 2, 4):
        a = ours(PROMPTS, num_inference_steps=steps, latents=_noise(), output_type="latent", **SIZE).frames
        b = _diffusers_latents(theirs, out, steps)
        assert a.shape == b.shape and (a - b).abs().max() < TOL, steps
    # decoded frames too: the same VAE, the same latent normalisation
    a = ours(PROMPTS, num_inference_steps=2, latents=_noise(seed=1), **SIZE).frames
    b = theirs(PROMPTS, num_inference_steps=2, latents=_noise(seed=1), max_sequence_length=text_max_length(out),
               **SIZE).frames
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_folder_diffusers_saved_opens_as_the_same_model(latent, tmp_path):
    _, out, _ = latent
    theirs = AnyFlowPipeline.from_pretrained(out)
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path / "theirs")  # diffusers' writer: no anyflow.json, no export.json
    assert not (tmp_path / "theirs" / "anyflow.json").exists()
    ours = open_folder(tmp_path / "theirs")
    a = ours(PROMPTS, num_inference_steps=3, latents=_noise(seed=2), output_type="latent", **SIZE).frames
    assert ours.config.text_max_length == 512  # Wan's, as diffusers' default, when the folder does not say
    b = theirs(PROMPTS, num_inference_steps=3, latents=_noise(seed=2), output_type="latent",
               max_sequence_length=ours.config.text_max_length, **SIZE).frames
    assert (a - b).abs().max() < TOL


def test_real_configs_export_bf16_and_diffusers_loads_it(latent, tmp_path):
    cfg, out, student = latent
    from anyflow_ray.training.export import export_dtype

    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        assert export_dtype(load_config(f"configs/{name}.yaml", [])) == torch.bfloat16
    folder = write_pipeline(student, cfg, tmp_path / "bf16", torch.bfloat16, step=7)
    size = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    full = (out / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 0.6 * full
    assert json.loads((folder / "export.json").read_text())["dtype"] == "bfloat16"
    theirs = AnyFlowPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert theirs.transformer.dtype == torch.bfloat16
    theirs.set_progress_bar_config(disable=True)
    b = _diffusers_latents(theirs, folder, 2).float()
    a = AnyFlowRayPipeline.from_pretrained(out)(PROMPTS, num_inference_steps=2, latents=_noise(), output_type="latent",
                                                **SIZE).frames
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # bf16 against fp32


def test_a_teacher_is_written_as_diffusers_wan_pipeline(latent, tmp_path):
    cfg, _, _ = latent
    teacher = load_transformer(cfg.model.base).eval()
    folder = write_pipeline(teacher, cfg, tmp_path / "teacher", torch.float32)
    theirs = DiffusionPipeline.from_pretrained(folder)
    assert type(theirs) is WanPipeline
    theirs.set_progress_bar_config(disable=True)
    ours = AnyFlowRayPipeline.from_pretrained(folder)
    assert type(ours.transformer).__name__ == "WanTransformer3DModel"
    a = ours(PROMPTS, num_inference_steps=1, latents=_noise(), output_type="latent", **SIZE).frames
    b = theirs(PROMPTS, num_inference_steps=1, latents=_noise(), output_type="latent", guidance_scale=1.0,
               max_sequence_length=text_max_length(folder), **SIZE).frames
    assert (a - b).abs().max() < TOL


def test_a_causal_export_with_the_compressed_context_is_diffusers_far_pipeline(latent, tmp_path):
    """A latent causal student with FAR's compressed context (4 chunks, limit 2) exports as
    ``AnyFlowFARPipeline``; diffusers samples it on its KV cache as the project does (32x32 latents at patch 4:
    a chunk is 128 tokens, clear of diffusers' unmasked padding, docs/method.md §6)."""
    from diffusers import AnyFlowFARPipeline

    from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel

    cfg, _, student = latent
    causal = WanCausalFlowMapTransformer3DModel.from_base(student, [2, 2, 2, 2], full_chunk_limit=2).eval()
    folder = write_pipeline(causal, cfg, tmp_path / "far", torch.float32, step=3)
    theirs = DiffusionPipeline.from_pretrained(folder)
    assert type(theirs) is AnyFlowFARPipeline and theirs.transformer.config.chunk_partition == [2, 2, 2, 2]
    theirs.set_progress_bar_config(disable=True)
    ours = AnyFlowRayPipeline.from_pretrained(folder)
    assert ours.transformer.config.full_chunk_limit == 2
    size = dict(num_frames=29, height=256, width=256)  # 8 latent frames of 32x32
    noise = torch.randn(1, 4, 8, 32, 32, generator=torch.Generator().manual_seed(4))
    for steps in (1, 2):
        a = ours(PROMPTS[:1], num_inference_steps=steps, latents=noise.clone(), output_type="latent", **size).frames
        b = theirs(PROMPTS[:1], num_inference_steps=steps, latents=noise.clone(), output_type="latent",
                   max_sequence_length=text_max_length(folder), **size).frames
        assert a.shape == b.shape and (a - b).abs().max() < TOL, steps


def test_a_path_that_is_no_pipeline_is_refused_naming_it(tmp_path):
    with pytest.raises(FolderError, match=str(tmp_path)):
        AnyFlowRayPipeline.from_pretrained(tmp_path)


def test_a_lora_export_loads_with_load_lora_weights_and_is_the_fused_model(latent, tmp_path):
    from omegaconf import OmegaConf

    from anyflow_ray.formats import write_lora
    from anyflow_ray.models.lora import apply_lora

    cfg, out, _ = latent
    lora = OmegaConf.create({"rank": 4, "alpha": 8, "target_modules": ["attn1.to_q", "attn1.to_v", "ffn.net.2"],
                             "flow_map_targets": ["time_embedder.linear_1", "delta_embedder.linear_1"]})
    model = load_transformer(out).eval()  # the stage's init: the exported student
    apply_lora(model, lora)
    torch.manual_seed(9)
    with torch.no_grad():  # trained adapters (fresh ones are zero on one side)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = write_lora(model, tmp_path / "lora", out, torch.float32)
    assert json.loads((folder / "lora.json").read_text())["base"] == str(out)
    model.fuse_lora()
    model.unload_lora()
    fused = write_pipeline(model, cfg, tmp_path / "fused", torch.float32)

    theirs = AnyFlowPipeline.from_pretrained(out)
    theirs.load_lora_weights(folder)
    theirs.set_progress_bar_config(disable=True)
    reference = AnyFlowPipeline.from_pretrained(fused)
    reference.set_progress_bar_config(disable=True)
    a, b = (_diffusers_latents(p, out, 2) for p in (theirs, reference))
    plain = _diffusers_latents(AnyFlowPipeline.from_pretrained(out), out, 2)
    assert (a - b).abs().max() < TOL and (a - plain).abs().max() > 100 * TOL  # the adapters matter


def test_a_lora_export_of_a_model_trained_partly_in_full_is_refused(latent, tmp_path):
    from omegaconf import OmegaConf

    from anyflow_ray.formats import write_lora
    from anyflow_ray.models.lora import apply_lora

    _, out, _ = latent
    model = load_transformer(out)
    apply_lora(model, OmegaConf.create({"rank": 4, "alpha": 4, "target_modules": ["attn1.to_q"]}))
    with pytest.raises(ValueError, match="delta_embedder.linear_1.weight.*trained in full"):
        write_lora(model, tmp_path / "lora", out)
    assert not (tmp_path / "lora").exists()


def test_diffusers_and_reference_folders_serve_as_teacher_stage_inits_and_evaluation_model(latent, tmp_path):
    from omegaconf import OmegaConf

    from anyflow_ray.models.flowmap import call_model
    from anyflow_ray.training.export import job_model, open_pipeline

    cfg, out, _ = latent
    theirs = AnyFlowPipeline.from_pretrained(out)
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path / "diffusers")
    folders = [tmp_path / "diffusers", reference_layout(tmp_path / "diffusers", tmp_path / "reference")]
    expected = _diffusers_latents(theirs, out, 2, seed=3)
    z, T = _noise(seed=4), torch.tensor([800.0, 300.0])
    context = torch.randn(2, 6, theirs.transformer.config.text_dim)
    with torch.no_grad():
        velocity = _diffusers_call(theirs.transformer, z, T, T, context)
    for folder in folders:
        # evaluation / sample model: diffusers' frames
        pipe = open_pipeline(folder)
        pipe.register_to_config(text_max_length=text_max_length(out))  # the prompt length diffusers is given
        got = pipe(PROMPTS, num_inference_steps=2, latents=_noise(seed=3), output_type="latent", **SIZE).frames
        assert (got - expected).abs().max() < TOL, folder
        # Stage-1 and Stage-2 init: the student the learner trains, with diffusers' weights
        for job, key in (("pretrain", "pretrain.init"), ("distill", "distill.init")):
            model = job_model(OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={folder}"])), job)
            assert all(torch.equal(model.state_dict()[k], v) for k, v in theirs.transformer.state_dict().items())
        # teacher (distill.teacher, pretrain.target=teacher): a single-time call is the flow map at r = t
        teacher = load_transformer(folder, flow_map=False).eval()
        with torch.no_grad():
            assert (call_model(teacher, z, T, context) - velocity).abs().max() < TOL


def _diffusers_call(transformer, z, T, R, context):
    frames = z.shape[2]
    out = transformer(z.permute(0, 2, 1, 3, 4), T[:, None].repeat(1, frames), R[:, None].repeat(1, frames), context,
                      return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)
