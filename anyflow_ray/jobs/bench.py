"""`anyflow-ray bench` (`make bench`): figures, not assertions. Each ratio is measured in one run:

1. Stage-1 learner step through Ray + DeepSpeed (one rank, driver wall time per ``train_step``) vs a
   plain single-process PyTorch loop with the same model, loss and batch (medians after warm-up).
2. Backward-simulation rollout (<= 3 calls) vs a full N-step rollout, N = 8, 16, 50 (mean over k).
3. Trainable-only weight sync (LoRA adapters + E_r) vs a full state-dict sync through the object store.
4. Stage-2 pipeline throughput (learner steps/s) with max_policy_lag = 1 vs 0, one rollout actor and
   one learner rank; and the driver's time per weight publish, object store vs torch.distributed.
5. The Stage-2 control plane apart from the model (``bench_control``, key ``control_plane_sim``): the
   real driver, buffer, registry and learner group with rollouts and learner steps replaced by sleeps
   (1 s, 0.25 s), 1-32 rollout actors: learner steps/s against the ideal, and the driver's time per step.
   ``--skip-control-plane`` leaves it out; ``--control-plane-only`` runs just it (into the same bench.json).
   With it, the Wan configs' planned fleet at the measured call costs (``bench_fleet``, key ``fleet_sim``):
   8 learner ranks and the ``rollout.num_actors: auto`` actors, the idle fractions of both.
6. The data path (``bench_data``, key ``data_scale``): one reader's peak resident memory and rows/s over
   an epoch of 2k, 20k and 200k tiny rows, streamed (``data.rank_shards``) and in memory; the stream's
   rows/s against what the tiny learner step of 1. consumes. ``--data-scale-only`` runs just it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.config import load_config
from anyflow_ray.jobs import bench_control, bench_data, bench_fleet
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.jobs.data import scaffold_untrained_run

WARMUP, MEASURED = 3, 10


def run(cfg: DictConfig, control_plane: str = "run", actors: tuple[int, ...] = bench_control.ACTOR_COUNTS) -> dict:
    """``control_plane``: "run" (after the other sections), "skip", or "only" (this section alone; the other
    figures already in bench.json are kept)."""
    if control_plane == "only":
        return _control_plane_only(cfg, actors)
    if control_plane == "data-only":
        return _data_scale_only(cfg)
    with tempfile.TemporaryDirectory(prefix="anyflow-bench-") as tmp:
        overrides = _bench_overrides(cfg, tmp)
        bench_cfg = load_config(None, overrides)
        prepare(bench_cfg, Path(tmp) / "bench")
        scaffold_untrained_run(bench_cfg)
        plain = _plain_loop_step_times(bench_cfg)
        learner, saves = _learner_step_times(bench_cfg)
        rollout = _rollout_speedups(bench_cfg)
        sync = _weight_sync_ratio(bench_cfg)
        runs = _pipeline_runs(overrides, tmp)
        control = (bench_control.simulate(f"{tmp}/control-plane", actors, quiet=True)
                   if control_plane == "run" else None)
        fleet = bench_fleet.simulate_fleet(f"{tmp}/fleet", quiet=True) if control_plane == "run" else None
    throughput = {0: runs["lag0"]["learner_steps_per_s"], 1: runs["lag1"]["learner_steps_per_s"]}
    sync_ms = {name: runs[name]["weight_sync"]["mean_s"] * 1e3 for name in ("lag1", "lag1_torch_dist")}
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
    print(f"Checkpoint per save (the trainable state): {saves['checkpoint_bytes'] / 2**20:.2f} MiB in "
          f"{saves['save_s']:.2f} s, against {saves['format2_checkpoint_bytes'] / 2**20:.2f} MiB with the pipeline "
          f"format 2 exported into every checkpoint; the stage's one export: {saves['export_bytes'] / 2**20:.2f} MiB "
          f"in {saves['export_s']:.2f} s")
    print("Backward simulation vs full N-step rollout (batch %d, mean over k):" % cfg.rollout.batch_size)
    for n, (full, backward) in rollout.items():
        print(f"  N={n:<3d} full {full * 1e3:8.1f} ms  backward sim {backward * 1e3:7.1f} ms  speed-up {full / backward:6.2f}x")
    print(f"Weight sync through the object store: trainable-only {sync['trainable_s'] * 1e3:.2f} ms "
          f"({sync['trainable_mb']:.2f} MB) vs full state dict {sync['full_s'] * 1e3:.2f} ms ({sync['full_mb']:.2f} MB): "
          f"{sync['full_s'] / sync['trainable_s']:.2f}x faster")
    print(f"Stage-2 pipeline, 1 rollout actor + 1 learner rank: lag 1 {throughput[1]:.2f} steps/s vs "
          f"lag 0 {throughput[0]:.2f} steps/s: {throughput[1] / throughput[0]:.2f}x")
    print(f"Stage-2 weight publish per version (lag 1, driver wall time): object store {sync_ms['lag1']:.1f} ms vs "
          f"torch.distributed (gloo) broadcast {sync_ms['lag1_torch_dist']:.1f} ms")
    result["checkpoint"] = saves
    result.update({"rollout_ms": {n: {"full": f * 1e3, "backward_sim": b * 1e3, "speedup": f / b}
                                  for n, (f, b) in rollout.items()},
                   "weight_sync": {**sync, "speedup": sync["full_s"] / sync["trainable_s"]},
                   "pipeline_steps_per_s": {"lag1": throughput[1], "lag0": throughput[0],
                                            "ratio": throughput[1] / throughput[0]},
                   "pipeline_publish_ms": {"object_store": sync_ms["lag1"], "torch_dist": sync_ms["lag1_torch_dist"]}})
    if control is not None:
        bench_control.print_table(control)
        result["control_plane_sim"] = control
    if fleet is not None:
        bench_fleet.print_fleet(fleet["by_size"])
        result["fleet_sim"] = fleet
    print("Data path, one reader, one epoch (peak resident memory growth, rows/s):")
    result["data_scale"] = bench_data.measure()
    bench_data.print_summary(result["data_scale"], _rows_per_s_consumed(result))
    _write(cfg, result)
    return result


def _rows_per_s_consumed(result: dict) -> float | None:
    """Rows a second the tiny Stage-1 learner step (one rank) of this bench consumes."""
    if "ray_deepspeed_step_s" not in result:
        return None
    return result["global_batch"] / result["ray_deepspeed_step_s"]


def _data_scale_only(cfg: DictConfig) -> dict:
    path = Path(cfg.run.output_dir) / "bench.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    print("Data path, one reader, one epoch (peak resident memory growth, rows/s):")
    result["data_scale"] = bench_data.measure()
    bench_data.print_summary(result["data_scale"], _rows_per_s_consumed(result))
    _write(cfg, result)
    return result


def _control_plane_only(cfg: DictConfig, actors: tuple[int, ...]) -> dict:
    path = Path(cfg.run.output_dir) / "bench.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="anyflow-bench-") as tmp:
        result["control_plane_sim"] = bench_control.simulate(f"{tmp}/control-plane", actors)
        result["fleet_sim"] = bench_fleet.simulate_fleet(f"{tmp}/fleet")
    _write(cfg, result)
    return result


def _write(cfg: DictConfig, result: dict) -> None:
    out = Path(cfg.run.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)


def _bench_overrides(cfg: DictConfig, tmp: str) -> list[str]:
    """The user's model sizes and batch, with every path in a scratch folder and one learner rank."""
    overrides = [f"run.output_dir={tmp}", "learner.num_ranks=1", "run.device=cpu",
                 f"run.threads={cfg.run.threads}", f"pretrain.global_batch={cfg.pretrain.global_batch}",
                 f"data.num_train={max(256, cfg.pretrain.global_batch)}", "data.num_heldout=8"]
    overrides += [f"model.tiny.{k}={v}" for k, v in cfg.model.tiny.items() if k != "patch_size"]
    return overrides


def _plain_loop_step_times(cfg: DictConfig) -> list[float]:
    import torch

    from anyflow_ray.data.shards import read_shards
    from anyflow_ray.models.loading import load_text_encoder, load_transformer, text_max_length
    from anyflow_ray.models.text import encode_prompts
    from anyflow_ray.training.objectives import PretrainObjective, TrainData, objective_models
    from anyflow_ray.training.optim import SimpleTrainer

    torch.set_num_threads(cfg.run.threads)
    tokenizer, encoder = load_text_encoder(cfg.model.base)
    uncond = encode_prompts(tokenizer, encoder, [cfg.model.negative_prompt], text_max_length(cfg.model.base))
    objective = PretrainObjective(TrainData(read_shards(Path(cfg.data.root) / "train"), uncond), cfg,
                                **objective_models(cfg, "pretrain"))
    model = load_transformer(cfg.pretrain.init, flow_map=True, gate=cfg.model.gate)
    pc = cfg.pretrain
    trainer = SimpleTrainer(model, lr=pc.lr, betas=tuple(pc.betas), warmup=pc.warmup, grad_clip=pc.grad_clip,
                            ema_decay=pc.ema, ema_warmup=pc.ema_warmup)
    times = []
    for step in range(WARMUP + MEASURED):
        start = time.perf_counter()
        trainer.train_step(lambda m, s=step: objective.loss(m, s))
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def _learner_step_times(cfg: DictConfig) -> tuple[list[float], dict]:
    """The learner's step times after warm-up, and one save and one export of the trained state: their
    wall time and bytes, against format 2 (a checkpoint that also held the exported pipeline)."""
    from anyflow_ray.jobs.ray_runtime import init_ray
    from learners.group import LearnerGroup

    init_ray(cfg)
    group = LearnerGroup(cfg, "pretrain", num_ranks=1)
    try:
        times = []
        for step in range(WARMUP + MEASURED):
            start = time.perf_counter()
            group.call("train_step", step)
            times.append(time.perf_counter() - start)
        root = Path(cfg.run.output_dir) / "bench-save"
        start = time.perf_counter()
        ckpt = Path(group.call("save", str(root), WARMUP + MEASURED)[0])
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        group.call("export_pipeline", str(root / "export"), WARMUP + MEASURED)
        export_s = time.perf_counter() - start
    finally:
        group.shutdown()
    size = lambda folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())  # noqa: E731
    saved, exported = size(ckpt), size(root / "export")
    return times[WARMUP:], {"checkpoint_bytes": saved, "export_bytes": exported, "save_s": save_s,
                            "export_s": export_s, "format2_checkpoint_bytes": saved + exported}


def _rollout_speedups(cfg: DictConfig) -> dict[int, tuple[float, float]]:
    import torch

    from anyflow_ray.sampling.rollouts import backward_simulation
    from anyflow_ray.models.loading import load_transformer
    from anyflow_ray.sampling.samplers import sample

    student = load_transformer(cfg.pretrain.init, flow_map=True).eval()
    batch = cfg.rollout.batch_size
    noise = torch.randn(batch, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
    context = torch.randn(batch, cfg.model.tiny.text_max_length, cfg.model.tiny.text_dim)
    out = {}
    with torch.no_grad():
        for n in (8, 16, 50):
            start = time.perf_counter()
            sample(student, noise, context, n)
            full = time.perf_counter() - start
            ks = range(0, n, max(1, n // 8))
            start = time.perf_counter()
            for k in ks:
                backward_simulation(student, noise, context, n, k)
            out[n] = (full, (time.perf_counter() - start) / len(ks))
    return out


def _weight_sync_ratio(cfg: DictConfig, repeats: int = 5) -> dict:
    import ray

    from anyflow_ray.jobs.ray_runtime import init_ray
    from anyflow_ray.models.loading import load_transformer
    from anyflow_ray.models.lora import apply_lora

    init_ray(cfg)
    student = load_transformer(cfg.pretrain.init, flow_map=True)
    apply_lora(student, OmegaConf.merge(cfg.model.lora, {"rank": 4, "alpha": 4}))
    trainable = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    full = {n: t.detach().clone() for n, t in student.state_dict().items()}

    def round_trip(state) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ray.get(ray.put(state))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    mb = lambda state: sum(t.numel() * t.element_size() for t in state.values()) / 2**20  # noqa: E731
    return {"trainable_s": round_trip(trainable), "full_s": round_trip(full), "trainable_mb": mb(trainable),
            "full_mb": mb(full)}


def _pipeline_runs(overrides: list[str], tmp: str, steps: int = 20) -> dict[str, dict]:
    """Pipeline summaries of three short Stage-2 runs: lag 0 and lag 1 (object store), lag 1 (torch_dist)."""
    from anyflow_ray.jobs import distill

    out = {}
    for name, lag, sync in (("lag0", 0, "object_store"), ("lag1", 1, "object_store"), ("lag1_torch_dist", 1, "torch_dist")):
        run_cfg = load_config(None, [*overrides, f"distill.max_policy_lag={lag}", f"distill.steps={steps}",
                                     f"distill.output={tmp}/stage2-{name}", "distill.resume=false",
                                     f"distill.weight_sync={sync}", f"distill.save_every={steps}",
                                     "rollout.num_actors=1", "run.wandb_mode=disabled"])
        out[name] = json.loads((distill.run(run_cfg) / "pipeline_summary.json").read_text())
    return out
