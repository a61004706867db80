"""Real video clips in: find captioned mp4 files, decode, resample to the training fps, crop to size.

Decoding goes through imageio-ffmpeg (the ffmpeg binding imageio's ffmpeg plugin uses): it is already a
dependency of the project for writing samples, its wheel ships a static ffmpeg binary (no system
ffmpeg, no compiler, no extra wheel as PyAV or decord would add), and it reads any container ffmpeg
reads. Frames come out as raw RGB; resampling, resizing and cropping happen here, in numpy/torch, so
the result does not depend on the ffmpeg build.

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
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

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


def _filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI such as s3://bucket/x."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_bytes(path: str) -> bytes:
    """The whole file at a local path or URI."""
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URI."""
    return f"{folder.rstrip('/')}/{name}"


def _list_folder(folder: str) -> list[str]:
    """Sorted file names directly inside a local folder or URI."""
    import pyarrow.fs as pafs

    fs, inner = _filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(PurePosixPath(info.path).name for info in infos if info.type == pafs.FileType.File)


def _is_folder(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
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
    """One clip before decoding: its key, where it came from, the mp4 bytes and the caption."""

    key: str
    source: str
    video: bytes
    caption: str


def _file_clip(item: dict) -> RawClip:
    key, source = item["key"], item["video"]
    caption = item["caption"]
    if not caption:
        try:
            meta = read_bytes(item["meta"])
        except (OSError, FileNotFoundError):
            raise ClipError(key, source, "missing caption") from None
        caption = caption_from_json(meta, key, item["meta"])
    try:
        video = read_bytes(source)
    except OSError as err:
        raise ClipError(key, source, f"unreadable ({err.__class__.__name__})") from err
    return RawClip(key, source, video, caption)


def _tar_clips(path: str, skip_keys: frozenset[str]) -> Iterator[RawClip | ClipError]:
    """Clips of a tar shard, grouped by key (members ``<key>.mp4`` and ``<key>.json``)."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(path))) as tar:
            for member in tar.getmembers():
                stem, dot, suffix = PurePosixPath(member.name).name.partition(".")
                if member.isfile() and stem not in skip_keys:
                    members.setdefault(stem, {})["." + suffix] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as err:
        yield ClipError("", path, f"unreadable tar shard ({err})")
        return
    for key, files in sorted(members.items()):
        source = f"{path}#{key}"
        if VIDEO_SUFFIX not in files:
            yield ClipError(key, source, "no video in the tar shard")
        elif CAPTION_SUFFIX not in files:
            yield ClipError(key, source, "missing caption")
        else:
            try:
                yield RawClip(key, source, files[VIDEO_SUFFIX], caption_from_json(files[CAPTION_SUFFIX], key, source))
            except ClipError as err:
                yield err


def iter_clips(item: dict, skip_keys: frozenset[str] = frozenset()) -> Iterator[RawClip | ClipError]:
    """The raw clips of one work item, or the ClipError of each that cannot be read; keys in
    ``skip_keys`` (already prepared) are left out."""
    if item["kind"] == "tar":
        yield from _tar_clips(item["video"], skip_keys)
    elif item["key"] not in skip_keys:
        try:
            yield _file_clip(item)
        except ClipError as err:
            yield err


# ----------------------------------------------------------------------------- decoding


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:120] if lines else err.__class__.__name__


def _decode(clip: RawClip, size: ClipSize) -> tuple[np.ndarray, float]:
    """The source frames ``size`` samples, uint8 (F, h, w, 3), and the source fps.

    The source fps is read from the container's metadata (ffmpeg's header) before any frame, so
    decoding stops at the last frame needed.
    """
    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=VIDEO_SUFFIX) as file:
        file.write(clip.video)
        file.flush()
        reader = imageio_ffmpeg.read_frames(file.name)
        frames: list[np.ndarray] = []
        try:
            meta = next(reader)
            width, height = meta["size"]
            fps = float(meta.get("fps") or 0)
            if not math.isfinite(fps) or fps <= 0:
                raise ClipError(clip.key, clip.source, "unreadable (no frame rate in the metadata)")
            indices = source_indices(size.frames, size.fps, fps)
            for raw in reader:
                frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
                if len(frames) > indices[-1]:
                    break
        except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as err:
            if isinstance(err, ClipError):
                raise
            raise ClipError(clip.key, clip.source, f"unreadable ({_first_line(err)})") from err
        finally:
            reader.close()
    if not frames:
        raise ClipError(clip.key, clip.source, "unreadable (no frames)")
    if len(frames) <= indices[-1]:
        available = int(np.sum(source_indices(len(frames) * size.frames + 1, size.fps, fps) < len(frames)))
        raise ClipError(clip.key, clip.source,
                        f"too short: {available} frames at {size.fps:g} fps, need {size.frames}")
    return np.stack([frames[i] for i in indices]), fps


def source_indices(frames: int, fps: float, source_fps: float) -> np.ndarray:
    """Which source frames make ``frames`` frames at ``fps``: frame i shows time i / fps."""
    return np.floor(np.arange(frames) * (source_fps / fps) + 1e-6).astype(np.int64)


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, C, h, w) -> (T, C, height, width): scale so the frame covers the target (shorter side
    first), antialiased, then cut out the centre."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[..., top:top + height, left:left + width]


def decode_clip(clip: RawClip, size: ClipSize) -> tuple[np.ndarray, float]:
    """uint8 (3, frames, height, width) of ``clip`` and its source fps; ClipError when it is unreadable
    or too short. uint8 rather than float: a quarter of the bytes between the decode tasks and the VAE."""
    frames, fps = _decode(clip, size)
    chosen = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, h, w) in [0, 255]
    resized = resize_and_crop(chosen, size.height, size.width)
    pixels = resized.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)  # (3, F, H, W)
    return pixels.contiguous().numpy(), fps


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1], the models' pixel range."""
    return torch.as_tensor(pixels).float() / 127.5 - 1.0


def load_clip(clip: RawClip, size: ClipSize) -> torch.Tensor:
    """float32 (3, frames, height, width) in [-1, 1]: decoded, resampled to ``size.fps``, cropped."""
    return to_model_range(decode_clip(clip, size)[0])


def write_mp4(path: str | os.PathLike, video: np.ndarray, fps: float) -> None:
    """Write a (3, F, H, W) clip in [-1, 1] as an H.264 mp4 (sides that are multiples of 16 stay exact)."""
    import imageio_ffmpeg

    frames = np.clip((np.asarray(video).transpose(1, 2, 3, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, quality=8,
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
