"""`anyflow-ray bench` (`make bench`): figures, not assertions.

Learner step time through Ray + DeepSpeed (one rank, driver-side wall time per `train_step` call)
against a plain single-process PyTorch loop with the same model, Stage-1 loss and batch; medians of
``--steps`` steps after warm-up, and their ratio.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.config import load_config
from anyflow_ray.jobs.common import log, prepare

WARMUP, MEASURED = 3, 10


def run(cfg: DictConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="anyflow-bench-") as tmp:
        bench_cfg = _bench_config(cfg, tmp)
        prepare(bench_cfg, Path(tmp) / "bench")
        _prepare_inputs(bench_cfg)
        plain = _plain_loop_step_times(bench_cfg)
        learner = _learner_step_times(bench_cfg)
    result = {
        "global_batch": cfg.pretrain.global_batch,
        "plain_pytorch_step_s": statistics.median(plain),
        "ray_deepspeed_step_s": statistics.median(learner),
    }
    result["ratio_ray_deepspeed_over_plain"] = result["ray_deepspeed_step_s"] / result["plain_pytorch_step_s"]
    print(f"Stage-1 learner step, batch {result['global_batch']}, median of {MEASURED} steps:")
    print(f"  plain PyTorch loop      {result['plain_pytorch_step_s'] * 1e3:8.1f} ms")
    print(f"  Ray + DeepSpeed (1 rank) {result['ray_deepspeed_step_s'] * 1e3:7.1f} ms")
    print(f"  ratio                    {result['ratio_ray_deepspeed_over_plain']:7.3f}x")
    out = Path(cfg.run.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)
    return result


def _bench_config(cfg: DictConfig, tmp: str) -> DictConfig:
    """The user's model sizes and batch, with every path in a scratch folder and one learner rank."""
    overrides = [f"run.output_dir={tmp}", "learner.num_ranks=1", "run.device=cpu",
                 f"run.threads={cfg.run.threads}", f"pretrain.global_batch={cfg.pretrain.global_batch}",
                 f"data.num_train={max(256, cfg.pretrain.global_batch)}", "data.num_heldout=8"]
    overrides += [f"model.tiny.{k}={v}" for k, v in cfg.model.tiny.items() if k != "patch_size"]
    return load_config(None, overrides)


def _prepare_inputs(cfg: DictConfig) -> None:
    from anyflow_ray.jobs import data
    from anyflow_ray.models.loading import load_transformer, make_tiny
    from anyflow_ray.pipeline import save_as_pipeline

    make_tiny(cfg.model.base, cfg.model.tiny)
    data.run(cfg)
    save_as_pipeline(load_transformer(cfg.model.base), cfg.model.base, cfg.teacher.output)


def _plain_loop_step_times(cfg: DictConfig) -> list[float]:
    import torch

    from anyflow_ray.data.shards import read_shards
    from anyflow_ray.models.loading import load_text_encoder, load_transformer, text_max_length
    from anyflow_ray.models.text import UNCONDITIONAL_PROMPT, encode_prompts
    from anyflow_ray.objectives import Stage1Objective, TrainData
    from anyflow_ray.training import SimpleTrainer

    torch.set_num_threads(cfg.run.threads)
    tokenizer, encoder = load_text_encoder(cfg.model.base)
    uncond = encode_prompts(tokenizer, encoder, [UNCONDITIONAL_PROMPT], text_max_length(cfg.model.base))
    objective = Stage1Objective(TrainData(read_shards(Path(cfg.data.root) / "train"), uncond), cfg)
    model = load_transformer(cfg.pretrain.init, flow_map=True, gate=cfg.model.gate)
    pc = cfg.pretrain
    trainer = SimpleTrainer(model, lr=pc.lr, betas=tuple(pc.betas), warmup=pc.warmup, grad_clip=pc.grad_clip,
                            ema_decay=pc.ema)
    times = []
    for step in range(WARMUP + MEASURED):
        start = time.perf_counter()
        trainer.train_step(lambda m, s=step: objective.loss(m, s))
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def _learner_step_times(cfg: DictConfig) -> list[float]:
    from anyflow_ray.jobs.ray_runtime import init_ray
    from learners.group import LearnerGroup

    init_ray(cfg)
    group = LearnerGroup(cfg, "stage1", num_ranks=1)
    try:
        times = []
        for step in range(WARMUP + MEASURED):
            start = time.perf_counter()
            group.run("train_step", step)
            times.append(time.perf_counter() - start)
    finally:
        group.shutdown()
    return times[WARMUP:]
