"""`anyflow-ray evaluate`: quality vs steps for every model in ``eval.models``.

The reference is the teacher's ``eval.reference_steps``-step Euler ODE solution (CFG
``eval.teacher_guidance``) from the same noise and held-out prompts. Single-time models (teachers)
sample with that CFG; flow maps with guidance 1 (CFG is fused into them). Prints a Markdown table and
writes ``results.json``, ``results.md`` and ``quality_vs_steps.png`` to ``eval.output``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.data.shards import read_shards
from anyflow_ray.evaluate import batched_sample, evaluate_model, format_table, is_flow_map, write_results
from anyflow_ray.jobs.common import heldout_root, log, prepare
from anyflow_ray.pipeline import AnyFlowPipeline
from anyflow_ray.sampling import draw_noise


def run(cfg: DictConfig) -> Path:
    ec = cfg.eval
    out, device, dtype = prepare(cfg, ec.output)
    heldout = read_shards(heldout_root(cfg))
    n = min(ec.num_prompts, len(heldout.prompts))
    prompts, contexts = heldout.prompts[:n], heldout.embeddings[:n].to(device, dtype)
    noise = draw_noise((n, *heldout.videos.shape[1:]), ec.seed, device, dtype)
    real = heldout.videos.to(device)
    teacher = AnyFlowPipeline.from_pretrained(cfg.teacher.output, dtype=dtype).to(device)
    uncond = teacher.encode_prompt([cfg.model.negative_prompt])  # c_null
    log.info("reference: teacher %d-step Euler, CFG %.1f, %d prompts", ec.reference_steps, ec.teacher_guidance, n)
    reference = batched_sample(teacher.transformer, noise, contexts, ec.reference_steps, cfg.schedule.shift,
                               ec.teacher_guidance, uncond, ec.batch_size)
    # a latent-space model's samples are decoded by its VAE for the adherence checks (pixels in [-1, 1])
    to_pixels = None if teacher.vae is None else (lambda z: teacher.decode(z) * 2 - 1)
    rows = []
    bar = tqdm(total=len(ec.models) * len(ec.steps), desc="evaluating")
    for model_dir in ec.models:
        if not (Path(model_dir) / "model_index.json").is_file():
            raise FileNotFoundError(f"eval.models: {model_dir} is not a pipeline folder (no model_index.json); "
                                    f"train it first or drop it from eval.models")
        pipe = teacher if Path(model_dir) == Path(cfg.teacher.output) else \
            AnyFlowPipeline.from_pretrained(model_dir, dtype=dtype).to(device)
        guidance = 1.0 if is_flow_map(pipe.transformer) else ec.teacher_guidance
        rows += evaluate_model(Path(model_dir).name, pipe.transformer, noise, contexts, prompts, uncond, reference,
                               real, [int(s) for s in ec.steps], cfg.schedule.shift, guidance, ec.batch_size,
                               ec.swd_projections, progress=lambda _: bar.update(), to_pixels=to_pixels)
    bar.close()
    meta = {"num_prompts": n, "reference_steps": ec.reference_steps, "teacher_guidance": ec.teacher_guidance,
            "reference_swd_floor": _data_floor(heldout.videos, n, ec.swd_projections)}
    paths = write_results(rows, out, meta)
    print(format_table(rows))
    log.info("SWD between two halves of the held-out data (noise floor): %.4f", meta["reference_swd_floor"])
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return out


def _data_floor(videos: torch.Tensor, n: int, projections: int) -> float:
    """SWD of ``n`` held-out clips against the rest: what a perfect model would score at this size."""
    from anyflow_ray.evaluate import sliced_wasserstein

    if len(videos) < 2 * n:
        n = len(videos) // 2
    return sliced_wasserstein(videos[:n], videos[n:], projections)
