"""Writing clips people can look at: GIF/MP4 per clip and a contact sheet of step counts side by side."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(clip: np.ndarray, scale: int = 8) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] -> uint8, each pixel repeated ``scale`` times (nearest)."""
    frames = (np.clip(clip, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def save_video(clip: np.ndarray, stem: str | Path, fps: int = 4, scale: int = 8) -> list[Path]:
    """``stem.gif`` always, ``stem.mp4`` when imageio's ffmpeg plugin is available."""
    import imageio.v2 as imageio

    frames = to_uint8(clip, scale)
    stem = Path(stem)
    written = [stem.with_suffix(".gif")]
    imageio.mimsave(written[0], list(frames), duration=1000 / fps, loop=0)
    try:
        import imageio_ffmpeg  # noqa: F401

        h, w = frames.shape[1:3]
        pad = ((0, 0), (0, (-h) % 16), (0, (-w) % 16), (0, 0))  # codecs want multiples of 16
        imageio.mimsave(stem.with_suffix(".mp4"), list(np.pad(frames, pad)), fps=fps, macro_block_size=1)
        written.append(stem.with_suffix(".mp4"))
    except (ImportError, RuntimeError, OSError):
        pass
    return written


MIN_FRAME_PX = 64  # contact-sheet frames are upscaled (nearest) to at least this many pixels a side


def frame_scale(height: int, width: int, min_px: int = MIN_FRAME_PX) -> int:
    """Integer nearest-neighbour factor that makes a ``height`` x ``width`` frame at least ``min_px`` a side."""
    return max(1, math.ceil(min_px / min(height, width)))


def write_contact_sheet(videos: dict[tuple[str, int], np.ndarray], prompts: list[str], steps: list[int],
                        path: str | Path, title: str = "", min_px: int = MIN_FRAME_PX) -> Path:
    """Rows = prompts, columns = step counts; each cell shows the clip's frames left to right, every frame
    upscaled (nearest, no smoothing) to at least ``min_px`` pixels a side so a 16x16 clip stays readable."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    frames, height, width = next(iter(videos.values())).shape[:3]
    scale = frame_scale(height, width, min_px)
    cell_w, cell_h, gap, line = frames * width * scale, height * scale, 8, 14
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = gap + max(int(draw_probe.textlength(p, font=font)) for p in prompts) + gap
    top = (line if title else 0) + line + gap
    sheet = Image.new("RGB", (label_w + len(steps) * (cell_w + gap), top + len(prompts) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 2), title, fill="black", font=font)
    for j, n in enumerate(steps):
        draw.text((label_w + j * (cell_w + gap), top - line - gap // 2), f"{n} step{'s' if n > 1 else ''}",
                  fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = top + i * (cell_h + gap)
        draw.text((gap, y + cell_h // 2 - line // 2), prompt, fill="black", font=font)
        for j, n in enumerate(steps):
            strip = np.concatenate(list(to_uint8(videos[(prompt, n)], scale)), axis=1)  # (H*s, F*W*s, 3)
            sheet.paste(Image.fromarray(strip), (label_w + j * (cell_w + gap), y))
    sheet.save(path)
    return Path(path)
