"""Bytes one checkpoint save writes (all ranks together), and the stage's one export, from the architecture.

A save (``training.checkpoint`` format 3) holds per DeepSpeed engine its trainable parameters (bf16 model
states: frozen weights are excluded) and their optimizer state (fp32 master + two AdamW moments, over
the ranks' partitions), plus the EMA of the student's trainable parameters (fp32). The stage's export
(once, at its end) is the transformer in ``run.export_dtype`` with the base's UMT5 and VAE hard-linked
(a copy where links are not possible). Format 2 wrote, in every checkpoint, the fp32 EMA pipeline with
fresh fp32 copies of UMT5-XXL and the VAE on top: the "before" column.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.memory_plan import (ADAM, BF16, FP32, GiB, Item, ModelCounts, no_lora, text_encoder_parameters,
                                         transformer_counts)

VAE_PARAMETERS = 126_892_531  # diffusers' AutoencoderKLWan (Wan2.1 VAE) default config, counted on the meta device


def engines(cfg: DictConfig, job: str) -> list[tuple[str, ModelCounts]]:
    """(name, counts) of the DeepSpeed engines a ``job`` checkpoint holds; the first one carries the EMA."""
    size, lora = cfg.model.full_size, cfg.model.lora
    if job == "teacher":
        return [("teacher", transformer_counts(size, False, lora))]
    student = transformer_counts(size, True, lora)
    if job == "pretrain":
        return [("student", student)]
    critic = transformer_counts(size, False, lora if lora.enabled else no_lora())
    if not lora.enabled:  # a full copy of the teacher: every parameter trainable
        critic = ModelCounts(critic.total, critic.total)
    return [("student G", student), ("critic F", critic)]


def checkpoint_items(cfg: DictConfig, job: str) -> tuple[list[Item], list[Item], float]:
    """(the items of one save, the items of the stage's export, the bytes one save wrote in format 2)."""
    found = engines(cfg, job)
    save = []
    for name, counts in found:
        save.append(Item(f"{name} model states (trainable)", BF16 * counts.trainable, f"{counts.trainable / 1e6:.1f} M "
                         f"trainable of {counts.total / 1e9:.2f} B; frozen weights excluded"))
        save.append(Item(f"{name} optimizer states", ADAM * counts.trainable, "fp32 master + 2 moments, all ranks"))
    ema = found[0][1]
    save.append(Item(f"{found[0][0]} EMA", FP32 * ema.trainable, "fp32, trainable parameters only"))
    dtype = str(OmegaConf.select(cfg, "run.export_dtype", default="auto"))
    width = FP32 if dtype == "fp32" or (dtype == "auto" and cfg.run.precision == "fp32") else BF16
    text, vae = text_encoder_parameters(), VAE_PARAMETERS
    export = [Item("transformer", width * ema.total, f"{'fp32' if width == FP32 else 'bf16'} (run.export_dtype={dtype})"),
              Item("UMT5-XXL + VAE, hard-linked from model.base", BF16 * text + FP32 * vae,
                   "0 new bytes where the file system links; a copy otherwise")]
    # format 2: every save also exported the EMA model in fp32 with fresh fp32 copies of UMT5 and the VAE,
    # and kept the frozen weights in the model states (LoRA excepted, which excluded them already)
    frozen = 0 if cfg.model.lora.enabled else sum(BF16 * (c.total - c.trainable) for _, c in found)
    before = sum(i.bytes for i in save) + frozen + FP32 * (ema.total + text + vae)
    return save, export, before


def report(cfg: DictConfig, job: str, per_node_host: float | None = None) -> str:
    """The lines ``--dry-run`` prints: a save's size and what it was in format 2, the export once per stage."""
    save, export, before = checkpoint_items(cfg, job)
    total, exported = sum(i.bytes for i in save), sum(i.bytes for i in export)
    lines = [f"per checkpoint save ({job}, all ranks together):"]
    lines += [f"  {i.name:<44s} {i.bytes / GiB:9.2f} GiB  {i.note}" for i in save]
    lines.append(f"  {'total':<44s} {total / GiB:9.2f} GiB  (format 2, with an fp32 pipeline in every "
                 f"checkpoint: {before / GiB:.1f} GiB)")
    lines.append("export, once per stage (at its end; anyflow-ray export for any checkpoint):")
    lines += [f"  {i.name:<44s} {i.bytes / GiB:9.2f} GiB  {i.note}" for i in export]
    lines.append(f"  {'total':<44s} {exported / GiB:9.2f} GiB")
    return "\n".join(lines)
