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


def test_dry_run_needs_a_full_size_model():
    with pytest.raises(ValueError, match="model.full_size"):  # in-process: a subprocess costs ~8 s of imports
        main(["pretrain", "--config", "configs/tiny.yaml", "--dry-run"])
