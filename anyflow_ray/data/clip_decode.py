"""Decoding one clip with ffmpeg in bounded memory: only the frames needed, resized and cropped by ffmpeg.

ffmpeg is the static binary imageio-ffmpeg ships (``imageio_ffmpeg.get_ffmpeg_exe()``: no system ffmpeg,
no extra wheel). A clip is read in two calls: a probe of its header (frame size and rate), then one
decode whose filter graph keeps the source frames ``source_indices`` names (``select``), scales them so
that they cover ``height x width`` (the shorter side first) and cuts out the centre (``crop``), and stops
after the last one (``-frames:v``). Python holds only the output, ``3 x frames x height x width`` uint8,
read straight from the pipe into its place in one array (planar RGB): never a source-resolution frame, never a float copy (the
decoder's own buffers, a few source frames, live in the ffmpeg process). ffmpeg reads a local file; a
clip that is bytes, a tar member or a URI is first copied to a temporary file, in chunks.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from anyflow_ray.data.video import ClipSize, RawClip

COPY_CHUNK = 8 << 20  # bytes per read when a clip is copied to a temporary file


def _clip_error(clip: "RawClip", reason: str):
    from anyflow_ray.data.video import ClipError

    return ClipError(clip.key, clip.source, reason)


def _first_line(text: str, fallback: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:120] if lines else fallback


@contextmanager
def local_video(clip: "RawClip") -> Iterator[str]:
    """A local file holding the clip's video: its own path, or a temporary copy (bytes, a tar member's
    byte range, a URI) removed afterwards."""
    if clip.path and clip.offset < 0 and "://" not in clip.path:
        yield clip.path
        return
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        if clip.video:
            file.write(clip.video)
        else:
            from anyflow_ray.data.video import filesystem_of

            fs, inner = filesystem_of(clip.path)
            with fs.open_input_file(inner) as source:
                if clip.offset >= 0:
                    source.seek(clip.offset)
                left = clip.size if clip.offset >= 0 else None
                while left is None or left > 0:
                    chunk = source.read(COPY_CHUNK if left is None else min(COPY_CHUNK, left))
                    if not chunk:
                        break
                    file.write(chunk)
                    left = None if left is None else left - len(chunk)
        file.flush()
        yield file.name


_SIZE = re.compile(r"\b(\d{1,5})x(\d{1,5})\b")
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(k?) (fps|tbr)\b")


def probe(path: str, clip: "RawClip") -> tuple[int, int, float]:
    """(width, height, fps) of the first video stream, from ffmpeg's header; ClipError when unreadable."""
    import imageio_ffmpeg

    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path],
                          capture_output=True, text=True, errors="replace")
    lines = [line for line in done.stderr.splitlines() if "Stream #" in line and "Video:" in line]
    if not lines:
        raise _clip_error(clip, f"unreadable ({_first_line(done.stderr, 'no video stream')})")
    size = _SIZE.search(lines[0].split("Video:", 1)[1])
    rates = {unit: float(value) * (1000 if kilo else 1) for value, kilo, unit in _RATE.findall(lines[0])}
    fps = rates.get("fps") or rates.get("tbr") or 0.0
    if size is None:
        raise _clip_error(clip, "unreadable (no frame size in the metadata)")
    if not math.isfinite(fps) or fps <= 0:
        raise _clip_error(clip, "unreadable (no frame rate in the metadata)")
    return int(size.group(1)), int(size.group(2)), fps


def source_indices(frames: int, fps: float, source_fps: float) -> np.ndarray:
    """Which source frames make ``frames`` frames at ``fps``: frame i shows time i / fps."""
    return np.floor(np.arange(frames) * (source_fps / fps) + 1e-6).astype(np.int64)


def filter_graph(indices: np.ndarray, height: int, width: int) -> str:
    """ffmpeg filters: keep the source frames ``indices`` (distinct, ascending), scale to cover
    ``height x width`` (aspect kept), centre crop, planar RGB."""
    select = "+".join(f"eq(n\\,{int(i)})" for i in indices)
    scale = f"max({height}/ih\\,{width}/iw)"
    return (f"select='{select}',"
            f"scale=w='max({width}\\,round(iw*{scale}))':h='max({height}\\,round(ih*{scale}))':flags=bilinear,"
            f"crop={width}:{height},format=gbrp")


PLANES = (1, 2, 0)  # ffmpeg's planar RGB (gbrp) stores G, B, R: the channel each plane fills


def decode_clip(clip: "RawClip", size: "ClipSize") -> tuple[np.ndarray, float]:
    """uint8 (3, frames, height, width) RGB of ``clip`` at ``size`` and its source fps; ClipError when it is
    unreadable or too short. Each frame's planes are read from ffmpeg's pipe straight into their places
    (planar output: no frame buffer, no transpose copy). uint8 rather than float: a quarter of the bytes
    between the decode tasks and the VAE."""
    import imageio_ffmpeg

    with local_video(clip) as path:
        _, _, fps = probe(path, clip)
        indices = source_indices(size.frames, size.fps, fps)
        distinct, inverse = np.unique(indices, return_inverse=True)
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", path,
                   "-an", "-sn", "-vf", filter_graph(distinct, size.height, size.width), "-fps_mode", "passthrough",
                   "-frames:v", str(len(distinct)), "-f", "rawvideo", "-pix_fmt", "gbrp", "-"]
        pixels = np.empty((3, len(distinct), size.height, size.width), dtype=np.uint8)
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
            got = 0
            try:
                while got < len(distinct) and all(_read_into(process.stdout, pixels[c, got]) for c in PLANES):
                    got += 1
            finally:
                process.stdout.close()
                code = process.wait()
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
    if got == 0:
        raise _clip_error(clip, f"unreadable ({_first_line(stderr, f'ffmpeg exit {code}, no frames')})")
    if got < len(distinct):  # the source ends before the last frame needed
        available = int(np.sum(indices <= distinct[got - 1]))
        raise _clip_error(clip, f"too short: {available} frames at {size.fps:g} fps, need {size.frames}")
    return (pixels if len(distinct) == len(indices) else pixels[:, inverse]), fps


def _read_into(stream, plane: np.ndarray) -> bool:
    """Fill ``plane`` (contiguous) from ``stream``; False when the stream ends first."""
    view, filled = memoryview(plane.reshape(-1)), 0
    while filled < plane.size and (n := stream.readinto(view[filled:])):
        filled += n
    return filled == plane.size


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1], the models' pixel range."""
    return torch.as_tensor(pixels).float() / 127.5 - 1.0


def load_clip(clip: "RawClip", size: "ClipSize") -> torch.Tensor:
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
