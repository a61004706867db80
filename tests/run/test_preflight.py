"""One-line errors before any resource is taken: the CLI's pre-flight of each job's inputs (no Ray here)."""

import numpy as np
import pytest

from anyflow_ray.cli import main
from anyflow_ray.data.shard_writer import write_shards


def write_data(root, width=32, frames=8, size=16, rows=4):
    """A train split of ``rows`` clips, 3 x frames x size x size, with prompt embeddings ``width`` wide."""
    rng = np.random.default_rng(0)
    return write_shards(root / "train", rng.standard_normal((rows, 3, frames, size, size), dtype=np.float32),
                        [f"clip {i}" for i in range(rows)], rng.standard_normal((rows, 4, width), dtype=np.float32),
                        list(range(rows)), shard_size=2)


def one_line(capsys, command, argv) -> str:
    assert main([command, "--config", "configs/tiny.yaml", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"anyflow-ray {command}: "), captured.err
    return lines[0]


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    write_data(tmp_path / "data")
    return [f"run.output_dir={tmp_path}", f"model.base={tiny_model_dir}", f"data.root={tmp_path / 'data'}"]


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: 1\n  output_dir: [x\n")
    assert main(["teacher", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:" in err and "malformed YAML" in err


def test_a_missing_model_names_the_key_and_path_before_ray_starts(tmp_path, capsys, monkeypatch):
    from anyflow_ray.jobs import train_loop

    def no_ray(cfg):  # the suite may hold a Ray instance already: what counts is that the job never asks
        raise AssertionError("init_ray was called: the pre-flight should have stopped the job first")

    monkeypatch.setattr(train_loop, "init_ray", no_ray)  # where pretrain would start Ray
    err = one_line(capsys, "pretrain", ["model.base=/nope", f"run.output_dir={tmp_path}"])
    assert "model.base=/nope: no such folder" in err
    assert not (tmp_path / "stage1").exists()  # nothing written either


def test_the_real_config_on_a_small_machine_names_its_missing_model_first(capsys):
    err = one_line(capsys, "pretrain", ["--config", "configs/wan2.1-t2v-1.3b.yaml"])
    assert "model.base=/mnt/anyflow/models/Wan2.1-T2V-1.3B-Diffusers: no such folder" in err


def test_outputs_follow_run_output_dir_and_the_message_says_so(tmp_path, capsys):
    err = one_line(capsys, "teacher", [f"run.output_dir={tmp_path / 'try'}"])
    assert f"model.base={tmp_path / 'try'}/base-model" in err and "follows run.output_dir" in err


def test_sample_of_a_missing_model_is_one_line_not_a_repo_id_error(capsys):
    err = one_line(capsys, "sample", ["sample.model=/nope"])
    assert "sample.model=/nope: no such folder" in err and "repo id" not in err


def test_sample_model_replaces_sample_models_in_the_pre_flight(tmp_path):
    from anyflow_ray.run import preflight
    from anyflow_ray.run.config import load_config

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model_index.json").write_text("{}")
    # the default sample.models (the Stage-2 folder) does not exist here; sample.model alone is what is sampled
    preflight.check(load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"sample.model={tmp_path}/student"]),
                    "sample")
    with pytest.raises(preflight.PreflightError, match="sample.models=.*stage2: no such folder"):
        preflight.check(load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}"]), "sample")


def test_a_truncated_shard_is_named(inputs, tmp_path, capsys):
    shard = sorted((tmp_path / "data" / "train").glob("shard-*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = one_line(capsys, "teacher", inputs)
    assert f"shard {shard} is not a readable Parquet file" in err


def test_embeddings_of_another_width_name_the_data_and_both_widths(tmp_path, tiny_model_dir, capsys):
    write_data(tmp_path / "narrow", width=16)
    err = one_line(capsys, "teacher", [f"run.output_dir={tmp_path}", f"model.base={tiny_model_dir}",
                                       f"data.root={tmp_path / 'narrow'}"])
    assert f"data.root={tmp_path / 'narrow'}" in err and "16 wide" in err and "text_dim=32" in err


def test_clips_not_divisible_by_the_patch_size_are_refused(tmp_path, tiny_model_dir, capsys):
    write_data(tmp_path / "odd", size=18)  # the tiny model's patch is 1 x 4 x 4
    err = one_line(capsys, "teacher", [f"run.output_dir={tmp_path}", f"model.base={tiny_model_dir}",
                                       f"data.root={tmp_path / 'odd'}"])
    assert "8 x 18 x 18" in err and "patch size [1, 4, 4]" in err


def test_debug_shows_the_traceback_instead(capsys):
    from anyflow_ray.run.preflight import PreflightError

    with pytest.raises(PreflightError, match="model.base=/nope"):
        main(["teacher", "--debug", "model.base=/nope"])


def test_bench_scale_refuses_the_full_model_on_the_cpu_unless_allowed(tmp_path, capsys):
    err = one_line(capsys, "bench-scale", ["--config", "configs/wan2.1-t2v-1.3b.yaml", "run.device=cpu",
                                           f"run.output_dir={tmp_path}"])
    assert "--allow-cpu" in err and "30 layers" in err
    assert not (tmp_path / "bench_scale.json").exists()


def test_prepare_names_a_missing_video_input_before_ray_starts(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the pre-flight"))
    line = one_line(capsys, "prepare", [f"run.output_dir={tmp_path}", f"model.base={tiny_model_dir}",
                                        f"prepare.input=[{tmp_path}/videos]"])
    assert line.endswith(f"prepare.input: {tmp_path}/videos: no such file or folder")
    (tmp_path / "videos").mkdir()
    line = one_line(capsys, "prepare", [f"run.output_dir={tmp_path}", f"model.base={tmp_path}/nope",
                                        f"prepare.input=[{tmp_path}/videos]"])
    assert f"model.base={tmp_path}/nope: no such folder" in line


def test_a_stage_folder_killed_before_its_export_is_refused_naming_the_command_that_completes_it(
        tmp_path, tiny_model_dir, inputs, capsys):
    import json

    import torch

    from anyflow_ray.pipeline import save_as_pipeline
    from anyflow_ray.models.loading import load_transformer
    from anyflow_ray.training import checkpoint as ckpt_io

    teacher = tmp_path / "teacher"
    (teacher / "config.yaml").parent.mkdir(parents=True)
    (teacher / "config.yaml").write_text(f"teacher:\n  output: {teacher}\n")
    ckpt = ckpt_io.step_dir(teacher, 4)
    ckpt_io.save_rank_state(ckpt, 0, {"rng.torch": torch.get_rng_state()})
    ckpt_io.save_meta(ckpt, {"format": 3, "step": 4, "world_size": 1, "files": ckpt_io.manifest(ckpt)})
    ckpt_io.write_latest(teacher, ckpt)
    err = one_line(capsys, "pretrain", inputs)
    assert f"pretrain.init={teacher}: holds a teacher run trained to step 4 whose export is missing" in err
    assert "`anyflow-ray teacher --config <its config>`" in err and f"`anyflow-ray export {teacher} --out {teacher}`" in err
    # a torn export (marker of another step) is refused alike; a complete one passes this check
    save_as_pipeline(load_transformer(tiny_model_dir), tiny_model_dir, teacher)
    capsys.readouterr()
    (teacher / "export.json").write_text(json.dumps({"step": 2, "files": {}}))
    assert "trained to step 4 whose export is missing" in one_line(capsys, "pretrain", inputs)
    (teacher / "export.json").write_text(json.dumps({"step": 4, "files": {}}))
    from anyflow_ray.run.preflight import finished_stage
    from anyflow_ray.run.config import load_config

    finished_stage(load_config("configs/tiny.yaml", inputs), "pretrain.init")  # no error


def test_a_model_folder_of_another_kind_is_refused_naming_what_it_holds(tmp_path, tiny_model_dir, inputs, capsys):
    """A single-time FAR model of the reference or another model as a stage's init: one line before Ray starts."""
    import json
    import shutil

    for name, extra, expected in (("FAR_Wan_Transformer3DModel", {"init_far_model": True}, "without the flow map"),
                                  ("UNet2DConditionModel", {}, "is not a Wan2.1 or AnyFlow transformer")):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": name, **extra}))
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "AnyFlowFARPipeline"}))
        line = one_line(capsys, "distill", [*inputs, f"distill.init={folder}"])
        assert f"distill.init: {folder / 'transformer'}: " in line and expected in line and name in line
