"""Procedural text-to-video data: one coloured shape moving over a dark background.

Every clip shows a single shape of a named kind and colour moving at constant speed in a
named direction. Colour, shape and direction are only given by the prompt
("a red circle moving left"), so a model has to read the prompt and model motion.
Everything is deterministic given ``VideoSpec.seed``.

Videos are float32 arrays of shape ``(3, frames, height, width)`` (channels, time, H, W)
with values in ``[-1, 1]`` (a pixel value ``p`` in ``[0, 1]`` is stored as ``2p - 1``).

The checks that read any video back (``detect_attributes``, ``adherence``) are
``anyflow_ray/evaluation/adherence.py``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.82, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

MIN_SIDE_PX = 8
MIN_FRAMES = 2
SHAPE_SIZE_RANGE = (0.40, 0.45)  # shape side as a fraction of the smaller frame side
TRAVEL_RANGE = (0.40, 0.50)  # total displacement as a fraction of the frame side moved along
BACKGROUND_GREY_RANGE = (0.05, 0.25)
BACKGROUND_TINT = 0.03

# Direction name -> unit step (dx, dy) in image coordinates (y grows downwards).
_DIRECTION_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_PROMPT_PATTERN = re.compile(r"^a (\w+) (\w+) moving (\w+)$")


class PromptAttributes(NamedTuple):
    """The three attributes a prompt names."""

    color: str
    shape: str
    direction: str


@dataclass(frozen=True)
class VideoSpec:
    """What one clip shows; ``seed`` fixes position, size, speed and background."""

    color: str
    shape: str
    direction: str
    seed: int

    def __post_init__(self) -> None:
        _check_attributes(self.color, self.shape, self.direction, context=repr(self))

    @property
    def prompt(self) -> str:
        """The text prompt for this clip, e.g. ``"a red circle moving left"``."""
        return f"a {self.color} {self.shape} moving {self.direction}"


def _check_attributes(color: str, shape: str, direction: str, context: str) -> None:
    """Raise ValueError (mentioning ``context``) when an attribute is not a known name."""
    for kind, value, known in (
        ("color", color, COLORS), ("shape", shape, SHAPES), ("direction", direction, DIRECTIONS)
    ):
        if value not in known:
            raise ValueError(f"{context}: unknown {kind} {value!r}, expected one of {list(known)}")


def parse_prompt(prompt: str) -> PromptAttributes:
    """Split a prompt of the form ``"a <color> <shape> moving <direction>"``."""
    match = _PROMPT_PATTERN.match(prompt.strip().lower()) if isinstance(prompt, str) else None
    if match is None:
        expected = "'a <color> <shape> moving <direction>'"
        raise ValueError(f"prompt {prompt!r} is not of the form {expected}")
    color, shape, direction = match.groups()
    _check_attributes(color, shape, direction, context=f"prompt {prompt!r}")
    return PromptAttributes(color, shape, direction)


def all_combinations() -> list[PromptAttributes]:
    """The 48 (colour, shape, direction) combinations in a fixed order."""
    return [PromptAttributes(*combo) for combo in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def sample_specs(n: int, seed: int) -> list[VideoSpec]:
    """Draw ``n`` specs, deterministic in ``seed``.

    Combinations are drawn in shuffled blocks of all 48, so every combination is equally
    likely and a batch of 48k specs holds each combination exactly k times. Each spec gets
    its own seed derived from ``seed``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    chosen: list[PromptAttributes] = []
    while len(chosen) < n:
        chosen.extend(combos[i] for i in rng.permutation(len(combos)))
    clip_seeds = rng.integers(0, 2**62, size=n)
    return [
        VideoSpec(attrs.color, attrs.shape, attrs.direction, int(clip_seed))
        for attrs, clip_seed in zip(chosen[:n], clip_seeds)
    ]


# ----------------------------------------------------------------------------- rendering


def shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Boolean mask of points at offsets (dx, dy) from the centre inside the shape.

    The shape fits a ``size`` x ``size`` box; the triangle is isosceles, apex up.
    """
    half = size / 2.0
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":
        depth_from_apex = dy + half  # 0 at the apex row, size at the base
        in_rows = (depth_from_apex >= 0) & (depth_from_apex <= size)
        return in_rows & (np.abs(dx) <= depth_from_apex / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _check_render_size(frames: int, height: int, width: int) -> None:
    """Raise ValueError naming the argument that is too small to render."""
    if frames < MIN_FRAMES:
        raise ValueError(f"frames must be >= {MIN_FRAMES} to show motion, got {frames}")
    for name, value in (("height", height), ("width", width)):
        if value < MIN_SIDE_PX:
            raise ValueError(f"{name} must be >= {MIN_SIDE_PX} px to render a shape, got {value}")


def _trajectory(
    rng: np.random.Generator, direction: str, size: float, frames: int, height: int, width: int
) -> np.ndarray:
    """Per-frame shape centres, shape (frames, 2) as (x, y); the shape stays inside."""
    step = np.array(_DIRECTION_STEPS[direction], dtype=float)
    frame_size = np.array([width, height], dtype=float)
    axis_length = frame_size[np.argmax(np.abs(step))]
    travel = min(rng.uniform(*TRAVEL_RANGE) * axis_length, axis_length - size)
    # Range of the starting centre for which the whole path keeps the shape inside.
    start_low = size / 2 + np.maximum(-step, 0.0) * travel
    start_high = frame_size - size / 2 - np.maximum(step, 0.0) * travel
    start = rng.uniform(start_low, start_high)
    return start + np.linspace(0.0, 1.0, frames)[:, None] * travel * step


def _background_color(rng: np.random.Generator) -> np.ndarray:
    """A dark, nearly grey colour in [0, 1] that cannot be mistaken for the palette."""
    grey = rng.uniform(*BACKGROUND_GREY_RANGE)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    return np.clip(grey + tint, 0.0, 1.0)


def clip_layout(
    spec: VideoSpec, frames: int = 8, height: int = 16, width: int = 16
) -> tuple[float, np.ndarray, np.ndarray]:
    """Shape side (px), per-frame centres (frames, 2) as (x, y) and background RGB in [0, 1]."""
    _check_render_size(frames, height, width)
    rng = np.random.default_rng(spec.seed)
    size = rng.uniform(*SHAPE_SIZE_RANGE) * min(height, width)
    centres = _trajectory(rng, spec.direction, size, frames, height, width)
    return size, centres, _background_color(rng)


def render_video(spec: VideoSpec, frames: int = 8, height: int = 16, width: int = 16) -> np.ndarray:
    """Render ``spec`` as a float32 array (3, frames, height, width) in [-1, 1].

    A pixel belongs to the shape when its centre lies inside it (no anti-aliasing).
    """
    size, centres, background = clip_layout(spec, frames, height, width)
    foreground = np.asarray(COLORS[spec.color])
    pixel_y, pixel_x = np.mgrid[0:height, 0:width] + 0.5
    video = np.empty((3, frames, height, width), dtype=np.float32)
    for t, (centre_x, centre_y) in enumerate(centres):
        inside = shape_coverage(spec.shape, pixel_x - centre_x, pixel_y - centre_y, size)
        frame = np.where(inside[None], foreground[:, None, None], background[:, None, None])
        video[:, t] = 2.0 * frame - 1.0
    return video


def write_clip_files(
    folder: str | Path, specs: Sequence[VideoSpec], frames: int, height: int, width: int, fps: float
) -> list[Path]:
    """Write each spec as ``clip-<i>.mp4`` + ``clip-<i>.json`` (``{"captions": [prompt], "seed": ...}``),
    the layout ``anyflow-ray prepare`` reads, so the real-video path runs on generated clips."""
    from anyflow_ray.data.video import write_mp4

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, spec in enumerate(specs):
        path = out / f"clip-{index:05d}.mp4"
        write_mp4(path, render_video(spec, frames, height, width), fps)
        path.with_suffix(".json").write_text(json.dumps({"captions": [spec.prompt], "seed": spec.seed}))
        paths.append(path)
    return paths
