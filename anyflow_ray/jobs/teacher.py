"""`anyflow-ray teacher`: train the single-time flow-matching teacher from scratch (ALGORITHM §3).

Reads the train shards, starts from the (random) transformer of ``model.base``, trains with AdamW,
warm-up, clipping and EMA, and saves an ``AnyFlowPipeline`` folder (EMA weights) to
``teacher.output``, with metrics in ``metrics.jsonl`` and a wandb run (offline by default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.data.shards import read_shards
from anyflow_ray.jobs.common import log, prepare, train_root
from anyflow_ray.losses import teacher_loss
from anyflow_ray.metrics import MetricsLogger
from anyflow_ray.models.loading import load_text_encoder, load_transformer, text_max_length
from anyflow_ray.models.text import UNCONDITIONAL_PROMPT, encode_prompts
from anyflow_ray.pipeline import AnyFlowPipeline
from anyflow_ray.training import SimpleTrainer


class BatchSampler:
    """Random minibatches over in-memory tensors, epoch by epoch, from one seeded generator."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the data set ({num_items} clips)")
        self.num_items, self.batch_size = num_items, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.empty(0, dtype=torch.long), 0

    def next_indices(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._order):
            self._order, self._pos = torch.randperm(self.num_items, generator=self.generator), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


def save_pipeline(model: torch.nn.Module, base: str | Path, out: str | Path) -> Path:
    """An AnyFlowPipeline folder around ``model`` with the base folder's text encoder and tokenizer."""
    tokenizer, encoder = load_text_encoder(base)
    pipe = AnyFlowPipeline(transformer=model, text_encoder=encoder, tokenizer=tokenizer,
                           text_max_length=text_max_length(base))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def run(cfg: DictConfig) -> Path:
    tc = cfg.teacher
    out, device, dtype = prepare(cfg, tc.output)
    clips = read_shards(train_root(cfg))
    tokenizer, encoder = load_text_encoder(cfg.model.base)
    uncond = encode_prompts(tokenizer, encoder, [UNCONDITIONAL_PROMPT], text_max_length(cfg.model.base)).to(device)
    model = load_transformer(cfg.model.base, flow_map=False, dtype=dtype).to(device)
    trainer = SimpleTrainer(model, lr=tc.lr, weight_decay=tc.weight_decay, warmup=tc.warmup,
                            grad_clip=tc.grad_clip, ema_decay=tc.ema)
    sampler = BatchSampler(len(clips.prompts), tc.batch_size, cfg.run.seed)
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)
    logger = MetricsLogger(out, "teacher", cfg)
    log.info("teacher: %d clips, %d steps of batch %d on %s", len(clips.prompts), tc.steps, tc.batch_size, device)
    bar = tqdm(range(tc.steps), desc="teacher", dynamic_ncols=True)
    running = None
    for step in bar:
        idx = sampler.next_indices()
        x0 = clips.videos[idx].to(device, dtype)
        context = clips.embeddings[idx].to(device, dtype)
        metrics = trainer.train_step(lambda m: teacher_loss(m, x0, context, uncond, generator, cfg.schedule.shift,
                                                            tc.uncond_prob))
        running = metrics["loss"] if running is None else 0.98 * running + 0.02 * metrics["loss"]
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            logger.log(step + 1, {f"teacher/{k}": v for k, v in metrics.items()})
    logger.close()
    trainer.ema.copy_to(model.parameters())
    save_pipeline(model.cpu().float(), cfg.model.base, out)
    log.info("teacher saved to %s (EMA weights); final running loss %.4f", out, running)
    return out
