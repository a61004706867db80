"""One format with the field: the flow map against diffusers' own ``AnyFlowTransformer3DModel`` (tiny, fp32).

diffusers takes (B, F, C, H, W) and per-frame timesteps; the project (B, C, F, H, W) and one (T, R) per
sample. Their time mixes differ only in rounding ((1 - g) e_t + g e_r against e_t + g (e_r - e_t)).
"""

import json

import pytest
import torch
from diffusers import AnyFlowTransformer3DModel
from safetensors.torch import load_file, save_file

from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel
from anyflow_ray.models.loading import ModelFormatError, load_transformer

TOL = 1e-5  # fp32; measured 6e-7 on the tiny model


def _student(tiny_model_dir):
    flow = load_transformer(tiny_model_dir, flow_map=True)
    torch.manual_seed(3)
    with torch.no_grad():  # every weight non-trivial, E_r apart from E_t
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow.eval()


def _inputs(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, channels, 4, 8, 8, generator=g)
    T = torch.tensor([900.0, 400.0])
    context = torch.randn(2, 6, 32, generator=g)
    return z, T, context


def _theirs(model, z, T, R, context):
    frames = z.shape[2]
    out = model(z.permute(0, 2, 1, 3, 4), T[:, None].repeat(1, frames), R[:, None].repeat(1, frames), context,
                return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def test_diffusers_loads_a_saved_flow_map_strictly_and_agrees(tiny_model_dir, tmp_path):
    flow = _student(tiny_model_dir)
    flow.save_pretrained(tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "AnyFlowTransformer3DModel" and config["gate_value"] == 0.25
    assert config["deltatime_type"] == "r" and "qk_norm" not in config
    theirs, info = AnyFlowTransformer3DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    z, T, context = _inputs(flow.config.in_channels)
    with torch.no_grad():
        for R in (T, 0.3 * T, 0 * T):
            ours = flow(z, T, context, timestep_r=R, return_dict=False)[0]
            assert (ours - _theirs(theirs.eval(), z, T, R, context)).abs().max() < TOL


def test_a_folder_diffusers_wrote_loads_back_as_the_flow_map(tiny_model_dir, tmp_path):
    flow = _student(tiny_model_dir)
    flow.save_pretrained(tmp_path / "ours")
    theirs = AnyFlowTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_transformer(tmp_path / "theirs", flow_map=True).eval()
    assert type(loaded) is WanFlowMapTransformer3DModel
    z, T, context = _inputs(flow.config.in_channels, seed=1)
    with torch.no_grad():
        assert (loaded(z, T, context, timestep_r=T / 3).sample - _theirs(theirs, z, T, T / 3, context)).abs().max() < TOL


def test_the_reference_layout_and_an_earlier_version_load_with_their_trained_r_embedder(tiny_model_dir, tmp_path):
    flow = _student(tiny_model_dir)
    flow.save_pretrained(tmp_path / "new")
    weights = load_file(tmp_path / "new" / "diffusion_pytorch_model.safetensors")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    z, T, context = _inputs(flow.config.in_channels, seed=2)
    with torch.no_grad():
        expected = flow(z, T, context, timestep_r=T / 2).sample
    # NVlabs/AnyFlow's FAR_Wan_Transformer3DModel config (older NVIDIA snapshots), same keys
    reference = {**config, "_class_name": "FAR_Wan_Transformer3DModel", "init_flowmap_model": True,
                 "init_far_model": False, "compressed_patch_size": [1, 4, 4], "full_chunk_limit": 3,
                 "chunk_partition": None, "qk_norm": "rms_norm_across_heads"}
    # anyflow-ray before the field's format: its own class name, flow_map_gate, time_embedder_r
    legacy = {**{k: v for k, v in config.items() if k not in ("gate_value", "deltatime_type")},
              "_class_name": "WanFlowMapTransformer3DModel", "flow_map_gate": 0.25}
    renamed = {k.replace("delta_embedder", "time_embedder_r"): v for k, v in weights.items()}
    for name, cfg, state in (("reference", reference, weights), ("legacy", legacy, renamed)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(state, tmp_path / name / "diffusion_pytorch_model.safetensors")
        loaded = load_transformer(tmp_path / name, flow_map=True).eval()
        with torch.no_grad():
            assert torch.equal(loaded(z, T, context, timestep_r=T / 2).sample, expected), name


def test_other_kinds_and_weights_that_do_not_fit_are_refused_naming_them(tiny_model_dir, tmp_path):
    flow = _student(tiny_model_dir)
    flow.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    weights = load_file(tmp_path / "ok" / "diffusion_pytorch_model.safetensors")
    cases = {"unet": ({**config, "_class_name": "UNet2DConditionModel"}, weights, "UNet2DConditionModel"),
             "far": ({**config, "_class_name": "AnyFlowFARTransformer3DModel", "full_chunk_limit": 3,
                      "chunk_partition": [2, 2], "compressed_patch_size": [1, 4, 4]}, weights,
                     "missing far_patch_embedding"),
             "far-config": ({**config, "_class_name": "AnyFlowFARTransformer3DModel", "full_chunk_limit": 1,
                             "chunk_partition": [2, 2]}, weights, "full_chunk_limit=1: needs >= 2"),
             "torn": (config, {k: v for k, v in weights.items() if "delta_embedder" not in k},
                      "missing condition_embedder.delta_embedder")}
    for name, (cfg, state, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(state, tmp_path / name / "diffusion_pytorch_model.safetensors")
        with pytest.raises(ModelFormatError, match=expected) as err:
            load_transformer(tmp_path / name, flow_map=True)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
