"""Stage 1 through the CLI: the real-scale dry run (a tiny run on the learner group: tests/jobs/test_readme_walk.py)."""

import pytest

from anyflow_ray.cli import main


def test_real_scale_dry_run_prints_counts_config_and_memory(capsys):
    assert main(["pretrain", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run", "learner.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    total = int(out.split("total ")[1].split()[0].replace(",", ""))
    trainable = int(out.split("trainable ")[1].split()[0].replace(",", ""))
    assert 1.3e9 < total < 1.8e9 and 0 < trainable < 0.2 * total  # LoRA 256 (adapters only): ~15% trainable
    assert '"stage": 3' in out and '"bf16"' in out
    assert "ZeRO-3" in out and "<- learner.zero_stage" in out.split("ZeRO-3")[1].splitlines()[0]


def test_dry_run_needs_a_full_size_model(capsys):
    """A config error: one line naming the key and a config that has it, exit 2 (in-process: a subprocess
    costs ~8 s of imports)."""
    assert main(["pretrain", "--config", "configs/tiny.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.full_size" in err[0] and "configs/wan2.1-t2v-1.3b.yaml" in err[0]


@pytest.mark.parametrize("config, job, limit_gib", [("wan2.1-t2v-1.3b", "pretrain", 5), ("wan2.1-t2v-14b", "distill", 25)])
def test_dry_run_prints_a_save_of_the_trainable_state_only(capsys, config, job, limit_gib):
    """A save holds the trainable state (LoRA adapters, their optimizer state, the EMA): the 14B Stage-2 one
    within 25 GiB, against the 100 GiB format 2 wrote with an fp32 pipeline in every checkpoint."""
    assert main([job, "--config", f"configs/{config}.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.split("per checkpoint save")[1]
    save = float(out.split("\n  total")[1].split()[0])
    before = float(out.split("in every checkpoint: ")[1].split()[0])
    export = float(out.split("export, once per stage")[1].split("\n  total")[1].split()[0])
    assert 0 < save < limit_gib and before > 3 * save and export > save / 2
    assert "frozen weights excluded" in out
