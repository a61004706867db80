"""Real video clips in: find captioned mp4 files (folders, tar shards, manifests) as work items.

Decoding (ffmpeg, only the frames needed, resized and cropped by ffmpeg) is in ``clip_decode.py``.
A tar shard is indexed by its headers alone (``index_tar``: each member's byte range, the file seeked
over, never read whole); its clips are then work items of their own (``kind: member``) whose video is
copied from that byte range when decoded, one clip at a time.

Inputs (``prepare.input``, a list whose items may mix kinds; local paths or ``pyarrow.fs`` URIs):

- a folder of ``<key>.mp4`` + ``<key>.json`` (``{"captions": ["...", ...]}``, the first is used);
- one ``<key>.mp4`` file (its caption in the ``<key>.json`` beside it);
- a WebDataset-style tar shard (``*.tar``) holding ``<key>.mp4`` + ``<key>.json`` members;
- a manifest (``*.csv`` or ``*.jsonl``) of rows with ``video`` (path, relative to the manifest's
  folder unless absolute or a URI), ``caption`` and optionally ``key`` (default: the file's stem).

Anything wrong with one clip (unreadable, too short, missing caption) raises :class:`ClipError`, whose
``reason`` the preparation job writes to its skip list instead of failing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

from anyflow_ray.data.clip_decode import (decode_clip, load_clip, source_indices, to_model_range,  # noqa: F401
                                          write_mp4)

VIDEO_SUFFIX = ".mp4"
CAPTION_SUFFIX = ".json"
MANIFEST_SUFFIXES = (".csv", ".jsonl")


class ClipError(ValueError):
    """One clip cannot be used; ``reason`` is short (for the skip list), ``source`` names the file."""

    def __init__(self, key: str, source: str, reason: str):
        super().__init__(f"{source}: clip {key!r}: {reason}")
        self.key, self.source, self.reason = key, source, reason


@dataclass(frozen=True)
class ClipSize:
    """What every prepared clip is made to: ``frames`` frames at ``fps``, ``height`` x ``width`` pixels."""

    frames: int
    fps: float
    height: int
    width: int


# ----------------------------------------------------------------------------- files and URIs


def filesystem_of(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI such as s3://bucket/x."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_bytes(path: str) -> bytes:
    """The whole file at a local path or URI."""
    fs, inner = filesystem_of(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URI."""
    return f"{folder.rstrip('/')}/{name}"


def _list_folder(folder: str) -> list[str]:
    """Sorted file names directly inside a local folder or URI."""
    import pyarrow.fs as pafs

    fs, inner = filesystem_of(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(PurePosixPath(info.path).name for info in infos if info.type == pafs.FileType.File)


def _is_folder(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem_of(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def stable_seed(key: str) -> int:
    """A seed for the clip ``key`` that is the same on every run and machine (63 bits of BLAKE2b)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


# ----------------------------------------------------------------------------- finding clips


def _file_item(key: str, video: str, caption: str | None = None) -> dict:
    """A clip stored as its own file; without ``caption`` it is read from ``<key>.json`` beside it."""
    meta = "" if caption is not None else video[: -len(VIDEO_SUFFIX)] + CAPTION_SUFFIX
    return {"kind": "file", "key": key, "video": video, "meta": meta, "caption": caption or ""}


def _folder_items(folder: str) -> list[dict]:
    names = _list_folder(folder)
    return [_file_item(name[: -len(VIDEO_SUFFIX)], _join(folder, name)) for name in names
            if name.endswith(VIDEO_SUFFIX)]


def _manifest_items(path: str) -> list[dict]:
    """Rows of a CSV (header: video,caption[,key]) or JSONL manifest."""
    text = read_bytes(path).decode()
    if path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    items = []
    for number, row in enumerate(rows, start=1):
        if not row.get("video"):
            raise ValueError(f"manifest {path}: row {number} has no 'video' (columns: video, caption, key)")
        video = row["video"]
        if "://" not in video and not os.path.isabs(video):
            video = _join(folder, video)
        key = row.get("key") or PurePosixPath(video).stem
        items.append(_file_item(key, video, caption=row.get("caption") or ""))
    return items


def list_sources(inputs: list[str]) -> list[dict]:
    """Work items for the inputs: one per clip file, one per tar shard (expanded by ``iter_clips``).

    Only names are read here (and manifests), never videos, so the driver stays light. A key seen
    twice is an error naming both places: prepared rows are found again by key.
    """
    items: list[dict] = []
    for path in inputs:
        if _is_folder(path):
            items += _folder_items(path)
        elif path.endswith(".tar"):
            items.append({"kind": "tar", "key": "", "video": path, "meta": "", "caption": ""})
        elif path.endswith(MANIFEST_SUFFIXES):
            items += _manifest_items(path)
        elif path.endswith(VIDEO_SUFFIX):
            items.append(_file_item(PurePosixPath(path).stem, path))
        else:
            raise ValueError(f"prepare.input: {path!r} is not a folder, an .mp4, a .tar shard or a "
                             f"{'/'.join(MANIFEST_SUFFIXES)} manifest")
    seen: dict[str, str] = {}
    for item in items:
        if item["kind"] == "file" and item["key"] in seen:
            raise ValueError(f"clip key {item['key']!r} appears twice: {seen[item['key']]} and {item['video']}")
        seen[item["key"]] = item["video"]
    return items


def caption_from_json(text: bytes | str, key: str, source: str) -> str:
    """The first caption of a ``{"captions": [...]}`` (or ``{"caption": "..."}``) document."""
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ClipError(key, source, f"caption file is not JSON ({err})") from err
    captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    if not captions or not isinstance(captions[0], str) or not captions[0].strip():
        raise ClipError(key, source, "missing caption")
    return captions[0].strip()


@dataclass
class RawClip:
    """One clip before decoding: its key, where it came from, its video and the caption. The video is
    ``video`` (bytes) when given, else the file ``path`` (local or a URI), else the ``size`` bytes at
    ``offset`` of ``path`` (a tar member): nothing is read before it is decoded."""

    key: str
    source: str
    video: bytes
    caption: str
    path: str = ""
    offset: int = -1
    size: int = 0


def _file_clip(item: dict) -> RawClip:
    key, source = item["key"], item["video"]
    caption = item["caption"]
    if not caption:
        try:
            meta = read_bytes(item["meta"])
        except (OSError, FileNotFoundError):
            raise ClipError(key, source, "missing caption") from None
        caption = caption_from_json(meta, key, item["meta"])
    fs, inner = filesystem_of(source)
    import pyarrow.fs as pafs

    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise ClipError(key, source, "unreadable (no such file)")
    return RawClip(key, source, b"", caption, path=source)


def _read_range(path: str, offset: int, size: int) -> bytes:
    fs, inner = filesystem_of(path)
    with fs.open_input_file(inner) as file:
        file.seek(offset)
        return file.read(size)


def index_tar(path: str) -> list[dict | ClipError]:
    """The clips of a tar shard as work items (``kind: member``, sorted by key): each ``<key>.mp4`` and
    ``<key>.json`` member's byte range, from the headers alone (the file is seeked over, not read), or the
    ClipError of a clip that lacks one of them (or of the shard when it cannot be read)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        fs, inner = filesystem_of(path)
        with fs.open_input_file(inner) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                stem, _, suffix = PurePosixPath(member.name).name.partition(".")
                if member.isfile():
                    members.setdefault(stem, {})["." + suffix] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as err:
        return [ClipError("", path, f"unreadable tar shard ({err})")]
    items: list[dict | ClipError] = []
    for key, files in sorted(members.items()):
        source = f"{path}#{key}"
        if VIDEO_SUFFIX not in files:
            items.append(ClipError(key, source, "no video in the tar shard"))
        elif CAPTION_SUFFIX not in files:
            items.append(ClipError(key, source, "missing caption"))
        else:
            (offset, size), (meta_offset, meta_size) = files[VIDEO_SUFFIX], files[CAPTION_SUFFIX]
            items.append({"kind": "member", "key": key, "video": path, "meta": "", "caption": "", "offset": offset,
                          "size": size, "meta_offset": meta_offset, "meta_size": meta_size})
    return items


def _member_clip(item: dict) -> RawClip:
    key, source = item["key"], f"{item['video']}#{item['key']}"
    try:
        meta = _read_range(item["video"], item["meta_offset"], item["meta_size"])
    except OSError as err:
        raise ClipError(key, source, f"unreadable ({err.__class__.__name__})") from err
    return RawClip(key, source, b"", caption_from_json(meta, key, source), path=item["video"],
                   offset=item["offset"], size=item["size"])


def iter_clips(item: dict, skip_keys: frozenset[str] = frozenset()) -> Iterator[RawClip | ClipError]:
    """The raw clips of one work item (a file, a tar member, or a whole tar shard: its members in key
    order), or the ClipError of each that cannot be read; keys in ``skip_keys`` (already prepared) are
    left out. Nothing of a video is read here."""
    if item["kind"] == "tar":
        for member in index_tar(item["video"]):
            if isinstance(member, ClipError):
                if member.key not in skip_keys:
                    yield member
            else:
                yield from iter_clips(member, skip_keys)
        return
    if item["key"] in skip_keys:
        return
    try:
        yield _member_clip(item) if item["kind"] == "member" else _file_clip(item)
    except ClipError as err:
        yield err


