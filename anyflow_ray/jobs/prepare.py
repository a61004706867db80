"""`anyflow-ray prepare`: captioned videos -> Parquet shards of Wan latents and UMT5 prompt embeddings.

A Ray Data job with streaming execution, so a data set of any size passes through bounded memory:

    work items (driver: names, and each tar shard's member byte ranges from index tasks) --shuffled, in
    blocks of prepare.clips_per_block--> flat_map, CPU tasks: decoded uint8 clips (data.frames at data.fps,
    data.height x data.width, by ffmpeg) --map_batches, VAE actor pool--> normalised latents
    --map_batches, text-encoder actor pool--> rows in the shard schema --write_parquet--> prepare.output

The actor pools take ``prepare.{vae,text}_concurrency`` actors (``auto``: sized from the cluster's GPUs,
``prepare_stages.pool_sizes``) of ``prepare.{vae,text}_gpus`` GPUs each; the models come from
``model.base`` (``vae/``, ``text_encoder/``, ``tokenizer/``), the VAE in ``prepare.vae_dtype``. Work items
are shuffled (seeded by ``data.seed``) before they are cut into blocks, so shards do not follow the input
order; with ``prepare.heldout_fraction`` that fraction of the clips found (the lowest key hashes) is written
to ``prepare.heldout_output`` instead, disjoint from the rest. ``c_null.safetensors`` (the negative
prompt's embedding, ``data/uncond.py``) is written once into the folder above ``prepare.output``.

A clip that cannot be used (unreadable, too short, no caption) is not an error of the job: it goes to
``<output>/skipped.jsonl`` (key, source, reason). Re-running continues: clips whose key is already in a
shard of either output are not decoded again, nor are those of the skip list (unless
``prepare.retry_skipped``: after fixing files), and each run writes new shard files
(``shard-<run>-<write uuid>-<task>.parquet``) beside the old ones. ``manifest.json`` is rewritten at the end.
With ``run.storage`` set, shards go straight to the storage URI.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from anyflow_ray.data.shard_writer import write_manifest
from anyflow_ray.data.shards import list_shard_files
from anyflow_ray.data.video import ClipSize, list_sources, stable_seed
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.jobs.prepare_stages import (SkipLog, TextStage, VaeStage, decode_task, encode_c_null, index_task,
                                             pool_sizes)
from anyflow_ray.run.config import ConfigError
from anyflow_ray.run.storage import Storage

SKIP_LIST = "skipped.jsonl"


# ----------------------------------------------------------------------------- the output


def output_location(cfg: DictConfig, folder: str | None = None) -> tuple[object, str]:
    """(pyarrow filesystem, path) of ``folder`` (default ``prepare.output``): the storage URI's when
    ``run.storage`` is set (and the folder lies under ``run.output_dir``), else the local (or shared-mount)
    folder."""
    import pyarrow.fs as pafs

    folder = str(cfg.prepare.output if folder is None else folder)
    storage = Storage.of(cfg)
    remote = storage.remote_of(folder)
    if remote is not None:
        return storage.fs, remote
    return pafs.LocalFileSystem(), str(Path(folder).absolute())


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


def _pipeline(cfg: DictConfig, items: list[dict], skip_log, pools: tuple[int, int]):
    import ray.data

    size = ClipSize(cfg.data.frames, cfg.data.fps, cfg.data.height, cfg.data.width)
    pc = cfg.prepare
    blocks = max(1, math.ceil(len(items) / pc.clips_per_block))  # several clips per block (and decode task)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.flat_map(decode_task, fn_kwargs=dict(size=size, skip_log=skip_log), num_cpus=pc.decode_cpus)
    ds = ds.map_batches(VaeStage, fn_constructor_kwargs=dict(cfg=cfg), batch_size=pc.vae_batch_size,
                        batch_format="numpy", concurrency=pools[0], num_gpus=pc.vae_gpus, num_cpus=pc.actor_cpus)
    return ds.map_batches(TextStage, fn_constructor_kwargs=dict(cfg=cfg), batch_size=pc.text_batch_size,
                          batch_format="numpy", concurrency=pools[1], num_gpus=pc.text_gpus,
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


def _check_cpus(cfg: DictConfig, cluster_cpus: float, pools: tuple[int, int]) -> None:
    """The actor pools hold their CPUs for the whole job: if they leave less than one decode task's
    worth, decoding never starts and Ray Data waits for ever. Refuse that at once (unless the cluster
    grows on demand)."""
    pc = cfg.prepare
    needed = (pools[0] + pools[1]) * pc.actor_cpus + pc.decode_cpus
    if needed > cluster_cpus and not cfg.run.autoscaling:
        raise ConfigError(f"prepare needs {needed:g} CPUs at least ({pools[0]} VAE + {pools[1]} text actors "
                          f"(prepare.vae_concurrency={pc.vae_concurrency}, prepare.text_concurrency="
                          f"{pc.text_concurrency}) x prepare.actor_cpus={pc.actor_cpus:g}, plus one decode task of "
                          f"prepare.decode_cpus={pc.decode_cpus:g}); the cluster has {cluster_cpus:g}: lower those keys")


def work_items(inputs: list[str], index) -> tuple[list[dict], list[dict]]:
    """(one work item per clip, skip records): files as listed, tar shards expanded into their members by
    ``index`` (a function of the tar paths: Ray tasks in the job). A key seen twice is an error naming both."""
    sources = list_sources(inputs)
    items = [item for item in sources if item["kind"] != "tar"]
    skipped: list[dict] = []
    for entries in index([item["video"] for item in sources if item["kind"] == "tar"]):
        for entry in entries:
            (items if "kind" in entry else skipped).append(entry)
    seen: dict[str, str] = {}
    for item in items:
        where = item["video"] + (f"#{item['key']}" if item["kind"] == "member" else "")
        if item["key"] in seen:
            raise ValueError(f"clip key {item['key']!r} appears twice: {seen[item['key']]} and {where}")
        seen[item["key"]] = where
    return items, skipped


def _index_tars(index, tars: list[str]) -> list[list]:
    """Each tar shard's work items from the Ray task ``index``, in the order of ``tars``, with a progress bar."""
    import ray
    from tqdm.auto import tqdm

    pending, results = {index.remote(tar): i for i, tar in enumerate(tars)}, [[] for _ in tars]
    with tqdm(total=len(tars), desc="indexing tar shards", disable=not tars) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update()
    return results


def heldout_keys(keys: list[str], fraction: float) -> set[str]:
    """The ``round(fraction * len(keys))`` keys of the lowest stable hashes: the same set on every run over
    the same clips, whatever their order."""
    count = round(fraction * len(keys))
    return set(sorted(keys, key=lambda key: (stable_seed(key), key))[:count])


def shuffled(items: list[dict], seed: int) -> list[dict]:
    """``items`` in a seeded random order (shards then hold clips from all over the input)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _write_c_null(cfg: DictConfig, fs, folder: str) -> str:
    """``c_null.safetensors`` in ``folder``, encoded by a Ray task on a text-encoder GPU, unless one for the
    same prompt, length and encoder is there already."""
    import ray

    from anyflow_ray.data.uncond import UNCOND_NAME, encoder_fingerprint, read_uncond, stored_mismatch, write_uncond
    from anyflow_ray.models.loading import text_max_length

    stored = read_uncond(folder, fs)
    if stored is not None and not stored_mismatch(stored[1], str(cfg.model.negative_prompt),
                                                  text_max_length(cfg.model.base), encoder_fingerprint(cfg.model.base)):
        return f"{folder}/{UNCOND_NAME}"
    task = ray.remote(num_gpus=cfg.prepare.text_gpus, num_cpus=cfg.prepare.actor_cpus)(encode_c_null)
    embedding, prompt, max_length, fingerprint = ray.get(task.remote(cfg))
    import torch

    return write_uncond(folder, torch.tensor(embedding), prompt, max_length, fingerprint, filesystem=fs)


def _write_split(cfg: DictConfig, fs, out: str, items: list[dict], skip_log, pools, run_tag: str
                 ) -> tuple[int, dict | None, float]:
    """Prepare ``items`` into ``out``: (rows written, manifest or None, seconds the pipeline ran)."""
    before, start = set(list_shard_files(out, fs)), time.perf_counter()
    if items:
        _pipeline(cfg, items, skip_log, pools).write_parquet(
            out, filesystem=fs, filename_provider=_shard_names(run_tag), min_rows_per_file=cfg.data.shard_size,
            max_rows_per_file=cfg.data.shard_size, row_group_size=cfg.data.row_group_size)
    seconds = time.perf_counter() - start if items else 0.0
    _drop_empty_files(fs, sorted(set(list_shard_files(out, fs)) - before))
    files = list_shard_files(out, fs)
    written = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in files if p not in before)
    return written, (write_manifest(out, fs) if files else None), seconds


def run(cfg: DictConfig) -> dict:
    import ray

    from anyflow_ray.jobs.ray_runtime import init_ray

    if not cfg.prepare.input:
        raise ValueError("prepare.input is empty: give folders, .mp4 files, .tar shards or .csv/.jsonl manifests, "
                         "e.g. prepare.input=[/data/videos]")
    out_dir, _, _ = prepare(cfg, Path(cfg.prepare.output).parent / "prepare")
    inputs = [p if "://" in p else str(Path(p).absolute()) for p in cfg.prepare.input]
    cfg = init_ray(cfg)
    resources = ray.cluster_resources()
    pools = pool_sizes(cfg, resources.get("GPU", 0.0))
    _check_cpus(cfg, resources.get("CPU", 0.0), pools)
    fs, out = output_location(cfg)
    splits = {"train": out}
    if cfg.prepare.heldout_fraction > 0:
        splits["heldout"] = output_location(cfg, cfg.prepare.heldout_output)[1]
    for folder in splits.values():
        fs.create_dir(folder, recursive=True)
    done = frozenset().union(*(prepared_keys(fs, folder) for folder in splits.values()))
    kept_skips = [] if cfg.prepare.retry_skipped else previous_skips(fs, out)
    leave_out = done | {record["key"] for record in kept_skips}
    index = ray.remote(num_cpus=min(1.0, cfg.prepare.decode_cpus))(index_task)
    all_items, tar_skips = work_items(inputs, lambda tars: _index_tars(index, tars))
    held = heldout_keys([item["key"] for item in all_items], cfg.prepare.heldout_fraction)
    todo = shuffled([item for item in all_items if item["key"] not in leave_out], int(cfg.data.seed))
    by_split = {"train": [i for i in todo if i["key"] not in held], "heldout": [i for i in todo if i["key"] in held]}
    log.info("prepare: %d clip(s) to prepare from %d input(s) (%d held out); %d already prepared in %s, %d skipped "
             "before%s; %d VAE and %d text-encoder actor(s)", len(todo), len(inputs), len(by_split["heldout"]),
             len(done), out, len(kept_skips), "" if cfg.prepare.retry_skipped else
             " (not retried: prepare.retry_skipped=false)", *pools)
    skip_log = ray.remote(num_cpus=0)(SkipLog).remote()
    ray.get(skip_log.add.remote(kept_skips + [r for r in tar_skips if r["key"] not in leave_out]))
    c_null = _write_c_null(cfg, fs, out.rsplit("/", 1)[0])
    run_tag = time.strftime("%Y%m%d%H%M%S")
    results = {name: _write_split(cfg, fs, folder, by_split[name], skip_log, pools, run_tag)
               for name, folder in splits.items()}
    seconds = sum(result[2] for result in results.values())
    written = sum(result[0] for result in results.values())
    skipped = ray.get(skip_log.records.remote())
    _write_skip_list(fs, out, skipped)
    totals = {name: result[1]["num_rows"] if result[1] else 0 for name, result in results.items()}
    summary = {"written": written, "skipped": len(skipped), "already_prepared": len(done), "total": totals["train"],
               "seconds": round(seconds, 2), "clips_per_s": round(written / seconds, 3) if written and seconds else 0.0,
               "output": out, "heldout_written": results.get("heldout", (0,))[0],
               "heldout_total": totals.get("heldout", 0), "heldout_output": splits.get("heldout", ""),
               "c_null": c_null, "vae_actors": pools[0], "text_actors": pools[1]}
    print(f"prepare: {written} clip(s) written, {len(skipped)} skipped (reasons in {out}/{SKIP_LIST}), "
          f"{len(done)} already prepared; {summary['total']} in {out}"
          + (f", {summary['heldout_total']} held out in {splits['heldout']}" if "heldout" in splits else "")
          + f" ({summary['clips_per_s']} clips/s)")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
