"""`anyflow-ray data`: render synthetic text-to-video clips, encode their prompts, write Parquet shards.

Writes ``<data.root>/train`` and ``<data.root>/heldout`` (disjoint seeds) and ``<data.root>/c_null.safetensors``
(the negative prompt's embedding, ``data/uncond.py``). Prompts are encoded with the text encoder of
``model.base`` so that training never needs the encoder.
``data.format=mp4`` writes the same clips as mp4 + json files instead, for ``anyflow-ray prepare``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.run.config import ConfigError
from anyflow_ray.data.shard_writer import write_shards
from anyflow_ray.data.synthetic import render_video, sample_specs, write_clip_files
from anyflow_ray.data.uncond import encoder_fingerprint, write_uncond
from anyflow_ray.jobs.common import heldout_root, log, prepare, train_root
from anyflow_ray.models.loading import load_text_encoder, text_max_length
from anyflow_ray.models.text import encode_prompts


def render_split(cfg: DictConfig, num: int, seed: int, desc: str) -> tuple[np.ndarray, list[str], list[int]]:
    specs = sample_specs(num, seed)
    videos = np.stack([render_video(s, cfg.data.frames, cfg.data.height, cfg.data.width)
                       for s in tqdm(specs, desc=f"rendering {desc}", leave=False)])
    return videos, [s.prompt for s in specs], [s.seed for s in specs]


def write_videos(cfg: DictConfig) -> Path:
    """``data.format=mp4``: the synthetic clips as mp4 + json files under ``<data.root>/videos/{train,heldout}``
    (the input of ``anyflow-ray prepare``) instead of shards."""
    root, _, _ = prepare(cfg, cfg.data.root)
    splits = (("train", cfg.data.num_train, cfg.data.seed), ("heldout", cfg.data.num_heldout, cfg.data.seed + 1_000_003))
    for name, num, seed in splits:
        folder = root / "videos" / name
        write_clip_files(folder, sample_specs(num, seed), cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.fps)
        log.info("%s: %d mp4 + json clips (%d frames at %g fps, %dx%d) in %s", name, num, cfg.data.frames,
                 cfg.data.fps, cfg.data.height, cfg.data.width, folder)
    return root


def run(cfg: DictConfig) -> Path:
    if cfg.data.format == "mp4":
        return write_videos(cfg)
    if not cfg.model.pixel_space:
        raise ConfigError("model.pixel_space=false: latents come from `anyflow-ray prepare`; write the synthetic "
                          "clips as videos with data.format=mp4 and prepare them (configs/tiny-latent.yaml)")
    root, _, _ = prepare(cfg, cfg.data.root)
    tokenizer, encoder = load_text_encoder(cfg.model.base)
    max_length = text_max_length(cfg.model.base)
    splits = (("train", train_root(cfg), cfg.data.num_train, cfg.data.seed),
              ("heldout", heldout_root(cfg), cfg.data.num_heldout, cfg.data.seed + 1_000_003))
    for name, out, num, seed in splits:
        videos, prompts, seeds = render_split(cfg, num, seed, name)
        embeddings = encode_prompts(tokenizer, encoder, prompts, max_length)
        shards = write_shards(out, videos, prompts, embeddings.numpy(), seeds, shard_size=cfg.data.shard_size,
                              row_group_size=cfg.data.row_group_size, format_version=int(cfg.data.shard_format))
        log.info("%s: %d clips %s in %d shard(s) under %s", name, num, tuple(videos.shape[1:]), len(shards), out)
    prompt = str(cfg.model.negative_prompt)
    write_uncond(str(cfg.data.root), encode_prompts(tokenizer, encoder, [prompt], max_length), prompt, max_length,
                 encoder_fingerprint(cfg.model.base))
    return root


def scaffold_untrained_run(cfg: DictConfig) -> Path:
    """make-tiny + data + untrained teacher and Stage-1 pipelines: the inputs of every training job, for
    tests and benchmarks whose figures do not depend on trained weights."""
    from anyflow_ray.models.loading import load_transformer, make_tiny
    from anyflow_ray.pipeline import save_as_pipeline

    make_tiny(cfg.model.base, cfg.model.tiny)
    run(cfg)
    for model, out in ((load_transformer(cfg.model.base), cfg.teacher.output),
                       (load_transformer(cfg.model.base, flow_map=True), cfg.pretrain.output)):
        save_as_pipeline(model, cfg.model.base, out, cfg.model.negative_prompt, cfg.schedule.shift)
    return Path(cfg.run.output_dir)
