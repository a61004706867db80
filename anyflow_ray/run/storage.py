"""One storage root for a run (``run.storage``), through ``pyarrow.fs``.

``run.storage: ""`` (the default): every process reads and writes ``run.output_dir`` directly. On one
machine that is a local folder; on a cluster it must be a mount every node shares (NFS, EFS, a PVC).

``run.storage: s3://bucket/prefix`` (or ``gs://``, ``hdfs://``, ``file:///abs/path``): the durable home
of the run for clusters whose nodes share no disk. ``run.output_dir`` is then a node-local staging
folder that mirrors it: whoever writes a file under ``run.output_dir`` uploads it to the same relative
path under ``run.storage`` (each file has one writer: the driver or a learner rank), and whoever needs
a file or folder under ``run.output_dir`` that its node lacks fetches it first (models, data shards,
checkpoints to resume from, the metrics to append to). Paths outside ``run.output_dir`` are left
alone. Uploads happen when a file is complete; a checkpoint's ``latest`` marker is uploaded last.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("anyflow_ray")


class StorageError(RuntimeError):
    pass


class Storage:
    def __init__(self, uri: str, local_root: str | Path):
        self.uri, self.local_root = uri, Path(local_root).absolute()
        self.fs, self.base = None, ""
        if uri:
            import pyarrow.fs as pafs

            try:
                self.fs, self.base = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as err:
                raise StorageError(f"run.storage={uri!r}: {err}") from err
            self.base = self.base.rstrip("/")

    @classmethod
    def of(cls, cfg) -> "Storage":
        return cls(cfg.run.storage, cfg.run.output_dir)

    @property
    def enabled(self) -> bool:
        return self.fs is not None

    def remote_of(self, local: str | Path) -> str | None:
        """The storage path mirroring ``local``; None when storage is off or ``local`` lies outside the run."""
        if not self.enabled:
            return None
        path = Path(local).absolute()
        if not path.is_relative_to(self.local_root):
            return None
        rel = path.relative_to(self.local_root).as_posix()
        return self.base if rel == "." else f"{self.base}/{rel}"

    def read_text(self, local: str | Path) -> str | None:
        """The stored copy of the file ``local``, read without writing anything on this node (None: storage
        is off or holds no such file). For small records: a half-fetched folder would hide the rest of it."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is None or self.fs.get_file_info(remote).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(remote) as stream:
            return stream.read().decode()

    def upload(self, local: str | Path) -> None:
        """Copy a file or a whole folder under ``run.output_dir`` to its place in storage."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is None:
            return
        local = Path(local).absolute()
        if not local.exists():
            raise StorageError(f"cannot upload {local}: it does not exist")
        parent = remote.rsplit("/", 1)[0] if local.is_file() else remote
        self.fs.create_dir(parent, recursive=True)
        pafs.copy_files(str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def fetch(self, local: str | Path, refresh: bool = False) -> bool:
        """Bring ``local`` (a file or folder under ``run.output_dir``) from storage when this node lacks it
        (or always, with ``refresh``). True when something was copied."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is None:
            return False
        local = Path(local).absolute()
        if local.exists() and not refresh:
            return False
        info = self.fs.get_file_info(remote)
        if info.type == pafs.FileType.NotFound:
            return False
        # copy beside the target, then rename: a process on the same node never sees half a folder, and
        # when two fetch the same thing at once the first rename wins and the other copy is dropped
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.fetch-{os.getpid()}")
        if info.type == pafs.FileType.Directory:
            partial.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s from %s", local, self.uri)
        pafs.copy_files(remote, str(partial), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            if refresh and local.is_file():
                os.replace(partial, local)
            else:
                partial.rename(local)
        except OSError:  # another process fetched it first
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        return True

    def fetch_all(self, paths) -> list[str]:
        """Fetch each of ``paths`` this node lacks (inputs of a job: models, data); the ones fetched."""
        return [str(p) for p in paths if p and self.fetch(p)]

    def list_names(self, local: str | Path) -> list[str]:
        """The names of the entries of the stored copy of folder ``local`` ([] when there is none)."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is None or self.fs.get_file_info(remote).type != pafs.FileType.Directory:
            return []
        return sorted(info.base_name for info in self.fs.get_file_info(pafs.FileSelector(remote)))

    def delete_file(self, local: str | Path) -> None:
        """Remove the storage copy of a file under ``run.output_dir`` (nothing when there is none)."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is not None and self.fs.get_file_info(remote).type == pafs.FileType.File:
            self.fs.delete_file(remote)

    def delete(self, local: str | Path) -> None:
        """Remove the storage copy of a folder under ``run.output_dir`` (checkpoint rotation)."""
        import pyarrow.fs as pafs

        remote = self.remote_of(local)
        if remote is not None and self.fs.get_file_info(remote).type == pafs.FileType.Directory:
            self.fs.delete_dir(remote)


def job_inputs(cfg, job: str) -> list[str]:
    """The folders a job's processes read: the base model (text encoder, tokenizer), the data, and the
    model the job starts from (Stage 1: ``pretrain.init``; Stage 2: ``distill.init`` and ``distill.teacher``)."""
    starts = {"teacher": [], "pretrain": [cfg.pretrain.init], "distill": [cfg.distill.init, cfg.distill.teacher]}[job]
    data = [] if cfg.data.rank_shards else [cfg.data.root]  # streamed in place (data_source), never fetched
    return [cfg.model.base, *data, *starts]


def data_source(cfg, split: str = "train") -> tuple[str, object]:
    """Where a data stream (``data.rank_shards``) reads ``split``'s shards, as (path or URI, pyarrow
    filesystem or None): ``data.root`` itself when it is a URI; the local folder when this node has it;
    else its copy under ``run.storage``, read in place (only the row groups a reader needs)."""
    root = str(cfg.data.root)
    if "://" in root:
        return f"{root.rstrip('/')}/{split}", None
    local = Path(root) / split
    storage = Storage.of(cfg)
    remote = storage.remote_of(local)
    if remote is None or local.is_dir():
        return str(local), None
    return remote, storage.fs
