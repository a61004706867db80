"""`anyflow-ray bench-scale`: the real Wan2.1-1.3B block layout, cut to one block and a tiny clip for the CPU."""

import json

import pytest

from anyflow_ray.cli import main
from anyflow_ray.jobs.bench_scale import latent_shape
from anyflow_ray.models.architectures import WAN_CONFIGS

ONE_BLOCK = ["--config", "configs/wan2.1-t2v-1.3b.yaml", "--layers", "1", "run.device=cpu", "run.precision=fp32",
             "data.frames=5", "data.height=16", "data.width=32"]


def test_one_block_of_the_real_architecture_runs_and_writes_its_figures(tmp_path, capsys):
    assert main(["bench-scale", "--steps", "2,4", *ONE_BLOCK, f"run.output_dir={tmp_path}"]) == 0
    result = json.loads((tmp_path / "bench_scale.json").read_text())
    assert result["latent_shape"] == [1, 16, 2, 2, 4] and result["num_layers"] == 1
    # One Wan2.1-1.3B block + embeddings + the flow map's second time MLP: far below 1.3B, far above tiny.
    assert 50e6 < result["parameters"] < 100e6
    assert result["diagonal_max_abs_diff"] == 0.0  # u(z, t, t) is the base model exactly at initialisation
    assert sorted(result["rollout_ms"]) == ["2", "4"]
    assert result["rollout_ms"]["4"]["ks"] == [0, 1, 2, 3]
    assert all(row["full"] > 0 and row["backward_sim"] > 0 for row in result["rollout_ms"].values())
    assert result["forward_backward_ms"] > 0 and result["peak_memory_gib"] is None  # no GPU memory on the CPU
    printed = capsys.readouterr().out
    assert "N=4" in printed and "speed-up" in printed and "max |u(z,t,t) - base(z,t)|" in printed


def test_latent_shape_follows_the_wan_vae_and_refuses_what_it_cannot_encode():
    patch = WAN_CONFIGS["1.3b"]["patch_size"]
    assert latent_shape(81, 480, 832, 16, patch) == (1, 16, 21, 60, 104)
    with pytest.raises(ValueError, match="data.frames=80"):
        latent_shape(80, 480, 832, 16, patch)
    with pytest.raises(ValueError, match="data.width=830"):
        latent_shape(81, 480, 830, 16, patch)


def test_needs_a_full_size_model_and_valid_flags(tmp_path, capsys):
    assert main(["bench-scale", "--config", "configs/tiny.yaml", f"run.output_dir={tmp_path}"]) == 2
    assert "needs model.full_size" in capsys.readouterr().err
    assert main(["bench-scale", "--steps", "8,x", *ONE_BLOCK, f"run.output_dir={tmp_path}"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench-scale", "--layers", "0", "--config", "configs/wan2.1-t2v-1.3b.yaml",
                 f"run.output_dir={tmp_path}"]) == 2
    assert not (tmp_path / "bench_scale.json").exists()
