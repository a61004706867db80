import subprocess
import sys

import pytest
import yaml

from anyflow_ray.run.config import ConfigError, load_config, save_config


def test_tiny_and_real_configs_load():
    tiny = load_config("configs/tiny.yaml")
    assert tiny.schedule.shift == 5.0 and tiny.model.pixel_space
    for name in ("configs/wan2.1-t2v-1.3b.yaml", "configs/wan2.1-t2v-14b.yaml"):
        cfg = load_config(name)
        assert cfg.schedule.shift == 5.0
        assert not cfg.model.pixel_space
        assert cfg.model.full_size in ("1.3b", "14b")


def test_the_wide_tiny_config_is_the_tiny_default_with_a_wider_model():
    wide = load_config("configs/tiny-wide.yaml")
    tiny = load_config("configs/tiny.yaml", ["run.output_dir=outputs/tiny-wide"])
    assert wide.teacher.output == "outputs/tiny-wide/teacher"
    changed = {key for key, value in wide.model.tiny.items() if tiny.model.tiny[key] != value}
    assert changed == {"num_attention_heads", "attention_head_dim", "ffn_dim", "patch_size"}
    assert list(wide.model.tiny.patch_size) == [2, 4, 4]
    assert wide.model.tiny.num_attention_heads * wide.model.tiny.attention_head_dim == 128
    assert {key for key, value in wide.teacher.items() if tiny.teacher[key] != value} == {"steps", "lr", "save_every"}
    # fewer Stage-1 steps: `make demo` runs this config, the consistency baseline included, within 30 minutes
    assert {key for key, value in wide.pretrain.items() if tiny.pretrain[key] != value} == {"steps", "save_every"}
    for section in ("run", "schedule", "data", "learner", "rollout", "distill", "sample", "eval"):
        assert wide[section] == tiny[section], section  # the rest is tiny.yaml's


def test_the_reproduction_run_trains_stage2_longer_from_the_demos_teacher_and_stage1():
    repro, demo = load_config("configs/tiny-repro.yaml"), load_config("configs/tiny-wide.yaml")
    assert (repro.teacher.output, repro.pretrain.output) == (demo.teacher.output, demo.pretrain.output)
    assert repro.distill.steps == 3 * demo.distill.steps and repro.distill.output != demo.distill.output
    outputs = [repro.distill.output, *repro.eval.consistency_models, repro.eval.output, repro.sample.output]
    assert all(path.startswith(f"{demo.run.output_dir}/repro/") for path in outputs)  # nothing of the demo's rewritten


def test_overrides_apply_and_interpolations_resolve():
    cfg = load_config("configs/tiny.yaml", ["teacher.steps=7", "run.output_dir=/tmp/x"])
    assert cfg.teacher.steps == 7
    assert cfg.teacher.output == "/tmp/x/teacher"


@pytest.mark.parametrize("override, key", [
    ("teacher.stepz=3", "stepz"),
    ("teacher.steps=abc", "teacher.steps"),
    ("model.gate=2.0", "model.gate"),
    ("eval.steps=[0,2]", "eval.steps"),
    ("nonsense", "nonsense"),
    ("eval.models=[${teacher.output}]", "eval.models"),  # YAML parse error, not a traceback
    ("distill.num_ranks=-1", "distill.num_ranks"),
    ("distill.real_weight=-1", "distill.real_weight"),
    ("distill.num_ranks=3", "distill.real_batch"),  # 16 clips cannot be split over 3 ranks
    ("pretrain.target=oracle", "pretrain.target"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("experiments.critic_times=normal", "experiments.critic_times"),
    ("experiments.dmd_shift=-1", "experiments.dmd_shift"),
    ("distill.grad_scope=prefix", "distill.grad_scope"),
    ("experiments.critic_updates=0", "experiments.critic_updates"),
    ("distill.critic_updates=3", "distill.critic_updates is now experiments.critic_updates"),
    ("distill.grad_scope=jump", "grad_scope=jump is now experiments.grad_jump_only=true"),
    ("experiments.rollout_weights=average", "experiments.rollout_weights"),
    ("distill.sync_backend=mpi", "distill.sync_backend"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])


@pytest.mark.parametrize("overrides, key", [
    (["model.causal.chunks=[2,2,2]"], "model.causal.chunks"),  # 6 of the 8 latent frames
    (["model.causal.chunks=[2,2,2,0,2]"], "model.causal.chunks"),
    (["model.causal.noisy_chunks=1"], "model.causal.noisy_chunks"),  # no chunks: bidirectional
    (["model.causal.chunks=[2,2,2,2]", "model.causal.noisy_chunks=5"], "model.causal.noisy_chunks"),
    (["model.causal.bidirectional_aux=0.1"], "model.causal.bidirectional_aux"),
    (["model.causal.chunks=[2,2,2,2]", "model.causal.long_context_prob=0.5"], "model.causal.long_context_prob"),
    (["model.causal.chunks=[2,2,2,2]", "model.causal.cache_chunks=-1"], "model.causal.cache_chunks"),
    (["sample.max_chunks=-1"], "sample.max_chunks"),
    (["model.causal.chunks=[2,2,2,2]", "pretrain.target=teacher"], "pretrain.target"),
    (["model.causal.chunks=[2,2,2,2]", "pretrain.target=data", "experiments.grad_jump_only=true"],
     "experiments.grad_jump_only"),
])
def test_bad_causal_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "="):
        load_config("configs/tiny.yaml", overrides)


def test_causal_chunks_tile_the_latent_frames_of_each_config():
    tiny = load_config("configs/tiny-causal.yaml")
    assert list(tiny.model.causal.chunks) == [2, 2, 2, 2] and tiny.pretrain.target == "data"
    assert tiny.run.output_dir == "outputs/tiny-causal" and tiny.sample.max_chunks == 8
    with pytest.raises(ConfigError, match="multiples of 2"):  # tiny-wide puts two frames in a patch
        load_config("configs/tiny-wide.yaml", ["model.causal.chunks=[1,3,2,2]", "pretrain.target=data"])
    latent = load_config("configs/tiny-latent.yaml", ["model.causal.chunks=[1,2]", "pretrain.target=data"])
    assert sum(latent.model.causal.chunks) == 3  # 9 frames through the Wan VAE: 3 latent frames


def test_frames_must_fill_whole_patches():
    assert load_config("configs/tiny-wide.yaml", ["data.frames=6"]).data.frames == 6
    with pytest.raises(ConfigError, match=r"data\.frames"):  # tiny-wide puts two frames in a patch
        load_config("configs/tiny-wide.yaml", ["data.frames=7"])


def test_stage2_learner_ranks_default_to_the_learner_groups():
    assert load_config("configs/tiny.yaml").distill.num_ranks == 1  # the tiny default keeps a core for rollouts
    assert load_config(None, ["learner.num_ranks=4"]).distill.num_ranks == 4  # the schema's default follows it
    assert load_config(None, ["distill.num_ranks=2", "learner.num_ranks=4"]).distill.num_ranks == 2
    with pytest.raises(ConfigError, match=r"^distill\.num_ranks=0: must be >= 1; left unset it follows learner\.num_ranks"):
        load_config("configs/tiny.yaml", ["distill.num_ranks=0"])  # what 0 meant before the default followed


def test_stage2_zero_stage_defaults_to_the_learner_groups_and_torch_dist_refuses_zero3():
    assert load_config("configs/tiny.yaml", ["learner.zero_stage=2"]).distill.zero_stage == 2
    assert load_config("configs/tiny.yaml", ["learner.zero_stage=2", "distill.zero_stage=3"]).distill.zero_stage == 3
    for zero in ("learner.zero_stage=3", "distill.zero_stage=3"):
        with pytest.raises(ConfigError, match=rf"^distill.weight_sync='torch_dist': .*{zero.split('=')[0]}=3"):
            load_config("configs/tiny.yaml", ["distill.weight_sync=torch_dist", zero])


def test_unknown_key_in_yaml_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)


def test_resolved_config_is_written(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}"])
    path = save_config(cfg, tmp_path / "run")
    saved = yaml.safe_load(path.read_text())
    assert saved["teacher"]["output"] == f"{tmp_path}/teacher"


def test_cli_fails_before_work_with_the_key_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anyflow_ray.cli", "teacher", "--config", "configs/tiny.yaml",
                           "teacher.bogus=1", f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
    assert not (tmp_path / "teacher").exists()


def test_a_config_extends_another_and_its_own_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text("teacher:\n  steps: 11\n  lr: 0.5\nrun:\n  output_dir: /tmp/base\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "child.yaml").write_text("extends: ../base.yaml\nteacher:\n  steps: 22\n")
    cfg = load_config(sub / "child.yaml", ["run.seed=3"])
    assert (cfg.teacher.steps, cfg.teacher.lr, cfg.run.output_dir, cfg.run.seed) == (22, 0.5, "/tmp/base", 3)
    assert cfg.teacher.output == "/tmp/base/teacher"  # interpolations resolve after the whole chain
    assert "extends" not in cfg


def test_extends_refuses_a_missing_parent_a_cycle_and_a_non_path(tmp_path):
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml \(extended by .*orphan\.yaml\)"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "num.yaml").write_text("extends: 3\n")
    with pytest.raises(ConfigError, match="extends=3"):
        load_config(tmp_path / "num.yaml")
