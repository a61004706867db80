import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

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
    # every stage's optimizer keys, checked alike (Stage 1 and 2 used to take these and fail far later)
    ("pretrain.lr=-1", "pretrain.lr"), ("distill.lr=nan", "distill.lr"), ("distill.critic_lr=inf", "distill.critic_lr"),
    ("pretrain.ema=1.5", "pretrain.ema"), ("distill.ema=-0.1", "distill.ema"), ("distill.grad_clip=-1", "distill.grad_clip"),
    ("pretrain.uncond_prob=2", "pretrain.uncond_prob"), ("teacher.weight_decay=-0.1", "teacher.weight_decay"),
    ("distill.betas=[0.9]", "distill.betas"),
    ("learner.timeout_s=60", "learner.timeout_s is now one limit per phase: learner.timeouts"),
    ("learner.timeouts.collective=60", "learner.timeouts.collective"), ("learner.timeouts.save=0", "learner.timeouts.save"),
    ("run.export_dtype=fp16", "run.export_dtype"),
    ("learner.grad_accum=0", "learner.grad_accum"), ("learner.grad_accum=3", "pretrain.global_batch"),
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


def _uncovered(table: dict) -> tuple[list[str], list[str]]:
    """(schema leaf keys without a line in ``table``, lines of ``table`` naming no schema key)."""
    from anyflow_ray.run.config_keys import schema_defaults

    schema = set(schema_defaults())
    return sorted(schema - set(table)), sorted(set(table) - schema)


def test_the_key_table_covers_exactly_the_schemas_leaf_keys():
    from anyflow_ray.run.config_keys import KEYS

    missing, stale = _uncovered(KEYS)
    assert (missing, stale) == ([], []), (f"schema keys without a line in config_keys.KEYS: {missing}; "
                                          f"KEYS lines of no schema key: {stale}")
    assert all(meaning.strip() for meaning in KEYS.values())
    # the check can fail: a key dropped from the table and a stale line are both named
    broken = {key: line for key, line in KEYS.items() if key != "distill.lr"} | {"distill.meta_init": "gone"}
    assert _uncovered(broken) == (["distill.lr"], ["distill.meta_init"])


def _printed_rows(text: str) -> dict[str, tuple[str, str]]:
    """key -> (its mark, the rest of its row) of `anyflow-ray config`'s output; a key printed twice fails."""
    from anyflow_ray.run.config_keys import KEYS

    rows: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        mark, _, rest = line[:1], line[1:2], line[2:]
        key = rest.split(" ", 1)[0]
        if line[1:2] == " " and mark in "* " and key in KEYS:
            assert key not in rows, f"{key} printed twice"
            rows[key] = (mark, rest[len(key):])
    return rows


def test_the_config_command_prints_every_key_once_with_overrides_and_changed_keys_marked(capsys):
    from anyflow_ray.cli import main
    from anyflow_ray.run.config_keys import KEYS

    overrides = ["distill.lr=3e-5", "learner.zero_stage=2", "run.output_dir=/tmp/elsewhere"]
    assert main(["config", "--config", "configs/tiny.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    rows = _printed_rows(out)
    assert set(rows) == set(KEYS)
    mark, rest = rows["distill.lr"]
    assert mark == "*" and rest.split()[:2] == ["3e-05", "2e-06"] and KEYS["distill.lr"] in rest
    assert rows["learner.zero_stage"][0] == "*"
    mark, rest = rows["distill.zero_stage"]  # follows learner.zero_stage: the same value, no mark
    assert mark == " " and rest.split()[:2] == ["2", "${learner.zero_stage}"]
    assert rows["distill.critic_lr"][0] == "*"  # tiny.yaml sets it: no longer distill.lr's
    assert rows["run.output_dir"][0] == "*" and rows["run.seed"][0] == " "
    mark, rest = rows["data.root"]  # its default follows run.output_dir
    assert mark == " " and rest.split()[:2] == ["/tmp/elsewhere/data", "${run.output_dir}/data"]
    assert out.splitlines()[0].startswith(f"# configs/tiny.yaml {' '.join(overrides)}: {len(KEYS)} keys, ")
    assert sum(mark == "*" for mark, _ in rows.values()) == int(out.split(" keys, ")[1].split()[0])


def test_the_config_command_fails_on_a_bad_key_and_imports_neither_ray_nor_torch(capsys):
    from anyflow_ray.cli import main

    assert main(["config", "distill.critic_updates=3"]) == 2
    assert "experiments.critic_updates" in capsys.readouterr().err
    probe = ("import sys; from anyflow_ray.cli import main; main(['config']); "
             "assert not {'ray', 'torch', 'deepspeed', 'diffusers'} & set(sys.modules), 'imported'")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _record(**distill) -> dict:
    """An earlier run's config.yaml (the schema's defaults), ``distill``'s keys as that version wrote them."""
    old = OmegaConf.to_container(load_config(None), resolve=True)
    old.pop("experiments")  # a version before the experiments group
    old["distill"].update(distill)
    return old


def test_an_old_records_follow_values_and_moved_keys_read_as_todays_keys():
    from anyflow_ray.run.records import config_changes

    new = OmegaConf.to_container(load_config(None), resolve=True)  # its defaults follow: no value set
    legacy = {"num_ranks": 0, "zero_stage": -1, "critic_lr": 0.0, "dmd_shift": 0.0, "critic_updates": 1,
              "critic_times": "logit_normal", "rollout_weights": "current"}
    assert config_changes(_record(**legacy), new, "distill") == []
    assert config_changes(_record(critic_updates=3), new, "distill") == ["experiments.critic_updates: 3 -> 1"]
    jump = config_changes(_record(grad_scope="jump"), new, "distill")
    assert jump == ["experiments.grad_jump_only: True -> False"]
    jump_now = OmegaConf.to_container(load_config(None, ["experiments.grad_jump_only=true"]),
                                      resolve=True)
    assert config_changes(_record(grad_scope="jump"), jump_now, "distill") == []
    # a follow value is the followed key's value: a record that followed distill.lr, against one that sets more
    faster = OmegaConf.to_container(load_config(None, ["distill.critic_lr=1e-4"]), resolve=True)
    assert config_changes(_record(critic_lr=0.0), faster, "distill") == [
        "distill.critic_lr: 2e-06 -> 0.0001"]


def test_a_yaml_file_setting_a_moved_key_is_told_where_it_lives_now(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("distill:\n  critic_updates: 3\n")
    with pytest.raises(ConfigError, match=r"distill\.critic_updates is now experiments\.critic_updates"):
        load_config(old)


def test_the_wan_configs_share_one_base():
    extends = {name: yaml.safe_load(open(f"configs/wan2.1-{name}.yaml")).get("extends")
               for name in ("base", "t2v-1.3b", "t2v-14b", "t2v-1.3b-causal", "t2v-14b-causal")}
    assert extends == {"base": None, "t2v-1.3b": "wan2.1-base.yaml", "t2v-14b": "wan2.1-base.yaml",
                       "t2v-1.3b-causal": "wan2.1-t2v-1.3b.yaml", "t2v-14b-causal": "wan2.1-t2v-14b.yaml"}
