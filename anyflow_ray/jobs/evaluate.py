"""`anyflow-ray evaluate`: quality vs steps for every model in ``eval.models``.

The reference is the teacher's ``eval.reference_steps``-step Euler ODE solution (CFG
``eval.teacher_guidance``) from the same noise and held-out prompts. Single-time models (teachers)
sample with that CFG; flow maps with guidance 1 (CFG is fused into them). Prints a Markdown table and
writes ``results.json``, ``results.md`` and ``quality_vs_steps.png`` to ``eval.output``.

With ``model.causal.chunks`` (docs/method.md §6) every model is also measured per chunk, and each causal
one streams videos of ``sample.max_chunks`` chunks (twice the training length when that is not longer)
from its rolling KV cache (``model.causal.cache_chunks``): per-chunk tables, ``chunk_rows`` in the JSON
and ``quality_per_chunk.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.data.shards import read_shards
from anyflow_ray.evaluation.quality import (FeatureScore, batched_sample, evaluate_model, evaluate_stream, format_chunk_tables,
                                  format_table, is_flow_map, write_results)
from anyflow_ray.models.causal import chunk_bounds, is_causal
from anyflow_ray.jobs.common import heldout_root, log, prepare
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.training.export import is_model, open_pipeline
from anyflow_ray.sampling.samplers import draw_noise
from anyflow_ray.evaluation.plots import write_contact_sheet


def run(cfg: DictConfig) -> Path:
    ec = cfg.eval
    out, device, dtype = prepare(cfg, ec.output)
    heldout = read_shards(heldout_root(cfg))
    n = min(ec.num_prompts, len(heldout.prompts))
    prompts, contexts = heldout.prompts[:n], heldout.embeddings[:n].to(device, dtype)
    noise = draw_noise((n, *heldout.videos.shape[1:]), ec.seed, device, dtype)
    real = heldout.videos.to(device)
    teacher = AnyFlowRayPipeline.from_pretrained(cfg.teacher.output, dtype=dtype).to(device)
    uncond = teacher.encode_prompt([cfg.model.negative_prompt])  # c_null
    log.info("reference: teacher %d-step Euler, CFG %.1f, %d prompts", ec.reference_steps, ec.teacher_guidance, n)
    reference = batched_sample(teacher.transformer, noise, contexts, ec.reference_steps, cfg.schedule.shift,
                               ec.teacher_guidance, uncond, ec.batch_size)
    # a latent-space model's samples are decoded by its VAE for the adherence checks (pixels in [-1, 1])
    to_pixels = None if teacher.vae is None else (lambda z: teacher.decode(z) * 2 - 1)
    chunks, cache_chunks = [int(c) for c in cfg.model.causal.chunks], int(cfg.model.causal.cache_chunks)
    stream_noise = _stream_noise(cfg, n, heldout.videos.shape[1:], device, dtype) if chunks else None
    features, fd_floor = _feature_score(cfg, heldout, n, prompts, to_pixels, device)
    rows, chunk_rows, kept = [], [], {}
    runs = [(m, "flowmap") for m in ec.models] + [(m, s) for m in ec.consistency_models for s in ("flowmap", "consistency")]
    bar = tqdm(total=len(runs) * len(ec.steps) * (2 if chunks else 1), desc="evaluating")
    for model_dir, sampler in runs:
        key = "eval.models" if sampler == "flowmap" and model_dir in ec.models else "eval.consistency_models"
        if not is_model(model_dir):
            raise FileNotFoundError(f"{key}: {model_dir} is neither a pipeline folder nor a checkpoint; "
                                    f"train it first or drop it from {key}")
        pipe = teacher if Path(model_dir) == Path(cfg.teacher.output) else \
            open_pipeline(model_dir, dtype).to(device)  # an exported folder or a checkpoint
        guidance = 1.0 if is_flow_map(pipe.transformer) else ec.teacher_guidance
        rows += evaluate_model(Path(model_dir).name, pipe.transformer, noise, contexts, prompts, uncond, reference,
                               real, [int(s) for s in ec.steps], cfg.schedule.shift, guidance, ec.batch_size,
                               ec.swd_projections, progress=lambda _: bar.update(), to_pixels=to_pixels,
                               chunks=chunks if sampler == "flowmap" else None, cache_chunks=cache_chunks,
                               chunk_rows=chunk_rows, features=features, sampler=sampler, keep=kept)
        if chunks and is_causal(pipe.transformer):
            chunk_rows += evaluate_stream(Path(model_dir).name, pipe.transformer, stream_noise, contexts, real, chunks,
                                          [int(s) for s in ec.steps], cfg.schedule.shift, cache_chunks, ec.batch_size,
                                          ec.swd_projections, progress=lambda _: bar.update())
        elif chunks:
            bar.update(len(ec.steps))
    bar.close()
    meta = {"num_prompts": n, "reference_steps": ec.reference_steps, "teacher_guidance": ec.teacher_guidance,
            "reference_swd_floor": _data_floor(heldout.videos, n, ec.swd_projections)}
    if features is not None:
        meta["reference_fd_floor"] = fd_floor
    if chunks:
        meta.update(chunks=chunks, cache_chunks=cache_chunks, stream_frames=stream_noise.shape[2],
                    chunk_swd_floor=[_data_floor(heldout.videos[:, :, a:b], n, ec.swd_projections)
                                     for a, b in chunk_bounds(chunks, heldout.videos.shape[2])])
    paths = write_results(rows, out, meta, chunk_rows)
    paths["comparison"] = write_comparison(kept, prompts, [int(s) for s in ec.steps], out / "comparison.png")
    print(format_table(rows))
    if chunk_rows:
        print("\n" + format_chunk_tables(chunk_rows))
    log.info("SWD between two halves of the held-out data (noise floor): %.4f", meta["reference_swd_floor"])
    if features is not None:
        log.info("FD of %d held-out clips against the others (noise floor at this count): %.1f", n, fd_floor)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return out


def write_comparison(kept: dict, prompts: list[str], steps: list[int], path: Path) -> Path:
    """One contact sheet of every evaluated model on the same prompts and noise: a row per (prompt, model),
    columns at the fewest steps, 4 (when evaluated) and the most. ``kept``: ``evaluate_model``'s ``keep``."""
    columns = sorted({steps[0], steps[-1], *([4] if 4 in steps else [])})
    labels = list(dict.fromkeys(label for label, _ in kept))
    videos, rows = {}, []
    for i, prompt in enumerate(prompts[:len(next(iter(kept.values())))]):
        for label in labels:
            rows.append(f"{label}: {prompt}")
            for n in columns:  # (C, F, H, W) in [-1, 1] -> (F, H, W, C) in [0, 1]
                videos[(rows[-1], n)] = ((kept[(label, n)][i].permute(1, 2, 3, 0) + 1) / 2).numpy()
    return write_contact_sheet(videos, rows, columns, path, title="the same prompts and noise, every model")


def _feature_score(cfg: DictConfig, heldout, n: int, prompts: list[str], to_pixels, device
                   ) -> tuple[FeatureScore | None, float | None]:
    """The Fréchet distance's scorer (``eval.frechet``) against the held-out clips past the first ``n`` (those
    give the prompts), and its floor: the first ``n`` clips scored like a model's samples. Only for data whose
    prompts name the synthetic attributes; the classifier is trained once and cached beside the shards."""
    from anyflow_ray.data.synthetic import parse_prompt
    from anyflow_ray.evaluation.features import classifier_for

    if not cfg.eval.frechet:
        return None, None
    try:
        for prompt in heldout.prompts:
            parse_prompt(prompt)
    except ValueError as err:
        log.info("no Fréchet distance: the data's prompts are not the synthetic attributes (%s)", err)
        return None, None
    classifier = classifier_for(cfg.data.root, device=device, progress=True, to_pixels=to_pixels)
    pixels = heldout.videos if to_pixels is None else to_pixels(heldout.videos.to(device))
    scorer = FeatureScore(classifier, pixels[n:] if len(pixels) > n else pixels)
    return scorer, scorer.score(pixels[:n], prompts)["fd"]


def _stream_noise(cfg: DictConfig, n: int, clip_shape, device, dtype) -> torch.Tensor:
    """Noise of the streaming videos: ``sample.max_chunks`` chunks, or twice the training length's chunks
    when that is not longer; chunks past the training length take the last chunk's size."""
    chunks = [int(c) for c in cfg.model.causal.chunks]
    count = cfg.sample.max_chunks if cfg.sample.max_chunks > len(chunks) else 2 * len(chunks)
    frames = sum(chunks) + (count - len(chunks)) * chunks[-1]
    channels, _, height, width = clip_shape
    return draw_noise((n, channels, frames, height, width), cfg.eval.seed + 1, device, dtype)


def _data_floor(videos: torch.Tensor, n: int, projections: int) -> float:
    """SWD of ``n`` held-out clips against the rest: what a perfect model would score at this size."""
    from anyflow_ray.evaluation.quality import sliced_wasserstein

    if len(videos) < 2 * n:
        n = len(videos) // 2
    return sliced_wasserstein(videos[:n], videos[n:], projections)
