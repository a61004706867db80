"""What a reader holds of the data set on the host, for the memory plan (``memory_plan.py``): one Wan row's
bytes as stored and as handed out, the training set's size from its manifest, a stream's windows."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.run.memory_plan import BF16, FP32, Item

WAN_TEXT = (512, 4096)  # UMT5-XXL: the padded prompt length and the embedding width of a Wan row


def row_bytes(cfg: DictConfig, videos: bool = True, stored: bool = True) -> int:
    """One Wan row in a reader's memory: 16-channel latents (4x temporal and 8x spatial compression) and a
    512 x 4096 UMT5 prompt embedding. ``stored``: as a stream's window holds it, in the shard format the
    data set is written in (``data.shard_format``; format 2: bf16 latents and bf16 states of the prompt's
    tokens only, at most ``dataset_tokens``; format 1: fp32, padded); else as rows are handed out (and
    ``read_shards`` holds them): fp32, padded to 512 tokens."""
    from anyflow_ray.run.config import latent_frames

    latent = 16 * latent_frames(cfg) * (cfg.data.height // 8) * (cfg.data.width // 8)
    tokens, width = WAN_TEXT
    if not stored or int(cfg.data.shard_format) == 1:
        return FP32 * (latent * videos + tokens * width)
    return BF16 * (latent * videos + dataset_tokens(cfg)[0] * width)


def _manifest(cfg: DictConfig) -> dict | None:
    """The training set's manifest when it is prepared on this machine, else None."""
    manifest = Path(str(cfg.data.root)) / "train" / "manifest.json"
    if "://" not in str(cfg.data.root) and manifest.is_file():
        return json.loads(manifest.read_text())
    return None


def dataset_rows(cfg: DictConfig) -> tuple[int, str]:
    """Rows of the training set: its manifest's when it is prepared, else ``data.num_train``."""
    manifest = _manifest(cfg)
    if manifest is not None:
        return int(manifest["num_rows"]), f"{cfg.data.root}/train/manifest.json"
    return int(cfg.data.num_train), "data.num_train"


def dataset_tokens(cfg: DictConfig) -> tuple[int, str]:
    """Prompt tokens a stored row holds at most: the manifest's ``max_embedding_length`` when the data set is
    prepared (format 2), else all 512 (the bound: a window may hold only the longest prompts)."""
    manifest = _manifest(cfg)
    if manifest is not None and "max_embedding_length" in manifest:
        return min(int(manifest["max_embedding_length"]), WAN_TEXT[0]), "the manifest's longest prompt"
    return WAN_TEXT[0], "prompts of up to 512 tokens"


def data_items(cfg: DictConfig, videos: bool = True) -> list[Item]:
    """What one reader holds of the data set: a stream's windows (``data.rank_shards``: the window it
    reads, the next one read ahead and that one's shuffled copy while it is made; rows as stored) or,
    otherwise, the whole data set as float32 (plus, while it loads, each shard as stored)."""
    rows, where = dataset_rows(cfg)
    stored, handed = row_bytes(cfg, videos), row_bytes(cfg, videos, stored=False)
    what = "latents + prompt embedding" if videos else "prompt embeddings only"
    fmt = int(cfg.data.shard_format)
    form = (f"shard format 2: bf16, {dataset_tokens(cfg)[0]} tokens ({dataset_tokens(cfg)[1]})" if fmt == 2
            else "shard format 1: fp32")
    if cfg.data.rank_shards:
        held = cfg.data.window_row_groups * cfg.data.row_group_size
        return [Item("data stream windows (x3: +read-ahead, shuffle)", 3 * held * stored,
                     f"{held} rows of {stored / 2**20:.1f} MiB ({what}, {form}; {handed / 2**20:.1f} MiB as "
                     f"fp32), whatever the data set's size ({rows:,} rows, {where})")]
    return [Item("data set in memory (+ shards as stored at load)", rows * (handed + stored),
                 f"{rows:,} rows ({where}) of {handed / 2**20:.1f} MiB fp32 ({what}; {stored / 2**20:.1f} MiB as "
                 f"stored, {form}) on every reader: set data.rank_shards=true to stream")]
