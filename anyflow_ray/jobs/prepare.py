"""`anyflow-ray prepare`: captioned videos -> Parquet shards of Wan latents and UMT5 prompt embeddings.

A Ray Data job with streaming execution, so a data set of any size passes through bounded memory:

    work items (driver: names only) --flat_map, CPU tasks--> decoded uint8 clips (data.frames at data.fps,
    data.height x data.width) --map_batches, VAE actor pool--> normalised latents
    --map_batches, text-encoder actor pool--> rows in the shard schema --write_parquet--> prepare.output

The actor pools take ``prepare.{vae,text}_concurrency`` actors of ``prepare.{vae,text}_gpus`` GPUs each
(0 on a laptop, 1 on a GPU cluster); the models come from ``model.base`` (``vae/``, ``text_encoder/``,
``tokenizer/``). A clip that cannot be used (unreadable, too short, no caption) is not an error of the
job: it goes to ``<output>/skipped.jsonl`` (key, source, reason). Re-running continues: clips whose key
is already in a shard of the output are not decoded again, nor are those of the skip list (unless
``prepare.retry_skipped``: after fixing files), and each run writes new shard files
(``shard-<run>-<write uuid>-<task>.parquet``) beside the old ones. ``manifest.json`` is rewritten at the end.
With ``run.storage`` set, shards go straight to the storage URI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from anyflow_ray.run.config import ConfigError
from anyflow_ray.data.shard_writer import prepared_table, write_manifest
from anyflow_ray.data.shards import list_shard_files
from anyflow_ray.data.video import ClipError, ClipSize, decode_clip, iter_clips, list_sources, stable_seed
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.run.storage import Storage

SKIP_LIST = "skipped.jsonl"


# ----------------------------------------------------------------------------- the stages


def _skip_record(error: ClipError) -> dict:
    return {"key": error.key, "source": error.source, "reason": error.reason}


def decode_item(item: dict, size: ClipSize, done: frozenset, skip_log) -> list[dict]:
    """CPU task: the decoded clips of one work item; the ones that cannot be used go to ``skip_log``."""
    import ray

    rows, skipped = [], []
    for clip in iter_clips(item, done):
        try:
            if isinstance(clip, ClipError):
                raise clip
            pixels, source_fps = decode_clip(clip, size)
        except ClipError as error:
            skipped.append(_skip_record(error))
            continue
        rows.append({"key": clip.key, "source": clip.source, "caption": clip.caption, "pixels": pixels,
                     "source_fps": source_fps})
    if skipped:
        ray.get(skip_log.add.remote(skipped))
    return rows


def _actor_device(cfg: DictConfig):
    """This actor's device, from the GPUs Ray gave it (never the driver's hardware)."""
    import ray

    from anyflow_ray.run.device import resolve_device, set_threads

    set_threads(cfg.run.threads)
    return resolve_device(cfg.run.device, len(ray.get_gpu_ids()))


class VaeStage:
    """Actor: uint8 pixels (B, 3, F, H, W) -> normalised posterior-mean latents (B, C, F', H', W')."""

    def __init__(self, cfg: DictConfig):
        from anyflow_ray.data.encode import latent_shape, load_vae

        self.vae = load_vae(cfg.model.base).to(_actor_device(cfg))
        self.shape = latent_shape(self.vae, cfg.data.frames, cfg.data.height, cfg.data.width)

    def __call__(self, batch: dict) -> dict:
        from anyflow_ray.data.encode import encode_video
        from anyflow_ray.data.video import to_model_range

        latents = encode_video(self.vae, to_model_range(np.stack(batch.pop("pixels")))).cpu().numpy()
        return {**batch, "latents": latents}


class TextStage:
    """Actor: captions -> UMT5 embeddings (as the Wan pipeline encodes them); emits shard rows."""

    def __init__(self, cfg: DictConfig):
        from anyflow_ray.run.device import resolve_dtype
        from anyflow_ray.models.loading import load_text_encoder, text_max_length

        device = _actor_device(cfg)
        self.tokenizer, encoder = load_text_encoder(cfg.model.base, resolve_dtype(cfg.run.precision, device))
        self.encoder = encoder.to(device)
        self.max_length = text_max_length(cfg.model.base)
        self.size = ClipSize(cfg.data.frames, cfg.data.fps, cfg.data.height, cfg.data.width)

    def __call__(self, batch: dict):
        from anyflow_ray.models.text import encode_prompts

        prompts = [str(c) for c in batch["caption"]]
        embeddings = encode_prompts(self.tokenizer, self.encoder, prompts, self.max_length).numpy()
        keys = [str(k) for k in batch["key"]]
        return prepared_table(np.stack(batch["latents"]), embeddings, prompts, keys, [str(s) for s in batch["source"]],
                              [stable_seed(k) for k in keys], self.size.frames, self.size.fps, self.size.height,
                              self.size.width)


# ----------------------------------------------------------------------------- the output


def output_location(cfg: DictConfig) -> tuple[object, str]:
    """(pyarrow filesystem, path) of ``prepare.output``: the storage URI's when ``run.storage`` is set
    (and the output lies under ``run.output_dir``), else the local (or shared-mount) folder."""
    import pyarrow.fs as pafs

    storage = Storage.of(cfg)
    remote = storage.remote_of(cfg.prepare.output)
    if remote is not None:
        return storage.fs, remote
    return pafs.LocalFileSystem(), str(Path(cfg.prepare.output).absolute())


def prepared_keys(fs, out: str) -> set[str]:
    """Keys already in the output's shards. A shard that cannot be read (a run stopped while writing
    it) is removed, so its clips are prepared again."""
    keys: set[str] = set()
    for path in list_shard_files(out, fs):
        try:
            table = pq.read_table(path, columns=["key"], filesystem=fs)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a broken file
            if "key" in str(err) and "FieldRef" in str(err):
                raise ValueError(f"{path}: a shard without a 'key' column; prepare.output={out} must hold only "
                                 "shards written by `anyflow-ray prepare`") from err
            log.warning("removing unreadable shard %s (%s): its clips are prepared again", path, err)
            fs.delete_file(path)
            continue
        keys.update(table.column("key").to_pylist())
    return keys


def previous_skips(fs, out: str) -> list[dict]:
    """The skip list of earlier runs ([] when there is none)."""
    import pyarrow.fs as pafs

    path = f"{out}/{SKIP_LIST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(path) as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines() if line.strip()]


def _write_skip_list(fs, out: str, records: list[dict]) -> None:
    unique = {(r["key"], r["source"]): r for r in records}  # a retried task may report a clip twice
    lines = [json.dumps(r) for r in sorted(unique.values(), key=lambda r: (r["source"], r["key"]))]
    with fs.open_output_stream(f"{out}/{SKIP_LIST}") as stream:
        stream.write(("\n".join(lines) + ("\n" if lines else "")).encode())


def _drop_empty_files(fs, paths: list[str]) -> None:
    """A write task whose clips were all skipped may leave a file without rows; readers refuse those."""
    for path in paths:
        if pq.read_metadata(path, filesystem=fs).num_rows == 0:
            fs.delete_file(path)


# ----------------------------------------------------------------------------- the job


def _pipeline(cfg: DictConfig, items: list[dict], done: frozenset, skip_log):
    import ray.data

    size = ClipSize(cfg.data.frames, cfg.data.fps, cfg.data.height, cfg.data.width)
    pc = cfg.prepare
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(decode_item, fn_kwargs=dict(size=size, done=done, skip_log=skip_log), num_cpus=pc.decode_cpus)
    ds = ds.map_batches(VaeStage, fn_constructor_kwargs=dict(cfg=cfg), batch_size=pc.vae_batch_size,
                        batch_format="numpy", concurrency=pc.vae_concurrency, num_gpus=pc.vae_gpus,
                        num_cpus=pc.actor_cpus)
    return ds.map_batches(TextStage, fn_constructor_kwargs=dict(cfg=cfg), batch_size=pc.text_batch_size,
                          batch_format="numpy", concurrency=pc.text_concurrency, num_gpus=pc.text_gpus,
                          num_cpus=pc.actor_cpus)


def _shard_names(run_tag: str):
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        """``shard-<run>-<write uuid>-<task>.parquet``: matches the readers' glob, sorts by run (Ray wants
        the write uuid in the name so that an append never overwrites)."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"shard-{run_tag}-{write_uuid}-{task_index:06d}.parquet"

        def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
            return self.get_filename_for_task(write_uuid, task_index)

    return ShardNames()


def _check_cpus(cfg: DictConfig, cluster_cpus: float) -> None:
    """The actor pools hold their CPUs for the whole job: if they leave less than one decode task's
    worth, decoding never starts and Ray Data waits for ever. Refuse that at once (unless the cluster
    grows on demand)."""
    pc = cfg.prepare
    pools = (pc.vae_concurrency + pc.text_concurrency) * pc.actor_cpus
    if pools + pc.decode_cpus > cluster_cpus and not cfg.run.autoscaling:
        raise ConfigError(f"prepare needs {pools + pc.decode_cpus:g} CPUs at least ({pc.vae_concurrency} VAE + "
                          f"{pc.text_concurrency} text actors x prepare.actor_cpus={pc.actor_cpus:g}, plus one "
                          f"decode task of prepare.decode_cpus={pc.decode_cpus:g}); the cluster has "
                          f"{cluster_cpus:g}: lower those keys")


def run(cfg: DictConfig) -> dict:
    import ray

    from anyflow_ray.jobs.ray_runtime import init_ray

    if not cfg.prepare.input:
        raise ValueError("prepare.input is empty: give folders, .mp4 files, .tar shards or .csv/.jsonl manifests, "
                         "e.g. prepare.input=[/data/videos]")
    out_dir, _, _ = prepare(cfg, Path(cfg.prepare.output).parent / "prepare")
    inputs = [p if "://" in p else str(Path(p).absolute()) for p in cfg.prepare.input]
    cfg = init_ray(cfg)
    _check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    fs, out = output_location(cfg)
    fs.create_dir(out, recursive=True)
    done = frozenset(prepared_keys(fs, out))
    kept_skips = [] if cfg.prepare.retry_skipped else previous_skips(fs, out)
    leave_out = done | {record["key"] for record in kept_skips}
    items = [item for item in list_sources(inputs) if item["kind"] == "tar" or item["key"] not in leave_out]
    log.info("prepare: %d work item(s) from %d input(s); %d clip(s) already prepared in %s, %d skipped before%s",
             len(items), len(inputs), len(done), out, len(kept_skips),
             "" if cfg.prepare.retry_skipped else " (not retried: prepare.retry_skipped=false)")
    skip_log = ray.remote(num_cpus=0)(SkipLog).remote()
    ray.get(skip_log.add.remote(kept_skips))
    before = set(list_shard_files(out, fs))
    start = time.perf_counter()
    if items:
        run_tag = time.strftime("%Y%m%d%H%M%S")
        _pipeline(cfg, items, leave_out, skip_log).write_parquet(
            out, filesystem=fs, filename_provider=_shard_names(run_tag), min_rows_per_file=cfg.data.shard_size,
            max_rows_per_file=cfg.data.shard_size, row_group_size=cfg.data.row_group_size)
    seconds = time.perf_counter() - start
    new_files = sorted(set(list_shard_files(out, fs)) - before)
    _drop_empty_files(fs, new_files)
    new_files = list_shard_files(out, fs)
    written = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in new_files if p not in before)
    skipped = ray.get(skip_log.records.remote())
    _write_skip_list(fs, out, skipped)
    manifest = write_manifest(out, fs) if new_files else None
    summary = {"written": written, "skipped": len(skipped), "already_prepared": len(done),
               "total": manifest["num_rows"] if manifest else 0, "seconds": round(seconds, 2),
               "clips_per_s": round(written / seconds, 3) if written and seconds else 0.0, "output": out}
    print(f"prepare: {written} clip(s) written, {len(skipped)} skipped (reasons in {out}/{SKIP_LIST}), "
          f"{len(done)} already prepared; {summary['total']} in {out} "
          f"({summary['clips_per_s']} clips/s)")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class SkipLog:
    """A Ray actor collecting the skip records of the decode tasks (any node; no shared disk needed)."""

    def __init__(self):
        self._records: list[dict] = []

    def add(self, records: list[dict]) -> None:
        self._records.extend(records)

    def records(self) -> list[dict]:
        return list(self._records)
