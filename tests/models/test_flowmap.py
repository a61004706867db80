import pytest
import torch

from anyflow_ray.models.architectures import count_parameters, meta_transformer
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel, call_model
from anyflow_ray.models.loading import load_transformer


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, 8, 16, 16, generator=g)
    T = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, 12, 32, generator=g)
    return z, T, context


def _perturbed_base(folder):
    base = load_transformer(folder)
    torch.manual_seed(1)
    with torch.no_grad():  # random, non-trivial weights (fresh Wan init zeroes some projections)
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


def _base_diagonal_and_off_diagonal(folder, seed=0):
    """Outputs of a perturbed base model and of its flow map at r = t and at r = 0.3 t."""
    base = _perturbed_base(folder)
    flow = WanFlowMapTransformer3DModel.from_base(base)
    z, T, context = _inputs(seed=seed)
    with torch.no_grad():
        expected = base(z, T, context, return_dict=False)[0]
        got = flow(z, T, context, timestep_r=T, return_dict=False)[0]
        off_diagonal = flow(z, T, context, timestep_r=0.3 * T, return_dict=False)[0]
    return expected, got, off_diagonal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagonal_equals_base_model_exactly(tiny_model_dir, seed):
    expected, got, off_diagonal = _base_diagonal_and_off_diagonal(tiny_model_dir, seed)
    assert torch.equal(got, expected)
    assert not torch.allclose(off_diagonal, expected)  # r is really an input


def test_diagonal_equals_base_model_with_two_frame_patches(tmp_path):
    from anyflow_ray.run.config import load_config
    from anyflow_ray.models.loading import make_tiny

    tiny = load_config("configs/tiny-wide.yaml").model.tiny
    assert list(tiny.patch_size) == [2, 4, 4]
    expected, got, off_diagonal = _base_diagonal_and_off_diagonal(make_tiny(tmp_path / "wide", tiny, channels=3))
    assert expected.shape == _inputs()[0].shape
    assert torch.equal(got, expected)
    assert not torch.allclose(off_diagonal, expected)


def test_r_embedder_is_a_copy_with_its_own_storage(tiny_model_dir):
    flow = WanFlowMapTransformer3DModel.from_base(_perturbed_base(tiny_model_dir))
    e_t, e_r = flow.condition_embedder.time_embedder, flow.condition_embedder.delta_embedder
    for (n1, p1), (n2, p2) in zip(e_t.named_parameters(), e_r.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert flow.config.gate_value == 0.25


def test_a_bf16_base_keeps_its_fp32_modules_in_the_flow_map(tiny_model_dir):
    # from_pretrained(torch_dtype=bf16) keeps Wan's time embedders and norms in fp32; the wrapper must too.
    base = load_transformer(tiny_model_dir, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in base.named_parameters()}
    assert {torch.float32, torch.bfloat16} <= set(dtypes.values())
    flow = WanFlowMapTransformer3DModel.from_base(base)
    for name, p in flow.named_parameters():
        expected = dtypes[name.replace("delta_embedder.", "time_embedder.")]
        assert p.dtype == expected, name


def test_call_model_dispatches_on_model_kind(tiny_model_dir):
    base = _perturbed_base(tiny_model_dir)
    flow = WanFlowMapTransformer3DModel.from_base(base)
    z, T, context = _inputs()
    with torch.no_grad():
        assert torch.equal(call_model(base, z, T, context, R=0 * T), call_model(base, z, T, context))
        assert not torch.equal(call_model(flow, z, T, context, R=0 * T), call_model(flow, z, T, context))


def test_flow_map_save_and_load_round_trip(tiny_model_dir, tmp_path):
    flow = WanFlowMapTransformer3DModel.from_base(_perturbed_base(tiny_model_dir))
    with torch.no_grad():
        flow.condition_embedder.delta_embedder.linear_1.weight.mul_(1.5)  # make E_r differ from E_t
    flow.save_pretrained(tmp_path / "transformer")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_transformer(tmp_path, flow_map=True)
    assert isinstance(loaded, WanFlowMapTransformer3DModel)
    z, T, context = _inputs()
    with torch.no_grad():
        assert torch.equal(flow(z, T, context, timestep_r=T / 2).sample, loaded(z, T, context, timestep_r=T / 2).sample)


@pytest.mark.parametrize("size, low, high", [("1.3b", 1.2e9, 1.6e9), ("14b", 13e9, 15e9)])
def test_full_size_configs_on_meta_device(size, low, high):
    model = meta_transformer(size)
    assert all(p.device.type == "meta" for p in model.parameters())
    n = count_parameters(model)
    assert low < n < high
    single = count_parameters(meta_transformer(size, flow_map=False))
    # the flow map adds exactly one copy of the time MLP
    assert n - single == count_parameters(model.condition_embedder.time_embedder)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_transformer(tmp_path / "nowhere")
