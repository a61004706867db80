"""Procedural text-to-video data: one coloured shape moving over a dark background.

Every clip shows a single shape of a named kind and colour moving at constant speed in a
named direction. Colour, shape and direction are only given by the prompt
("a red circle moving left"), so a model has to read the prompt and model motion.
Everything is deterministic given ``VideoSpec.seed``.

Videos are float32 arrays of shape ``(3, frames, height, width)`` (channels, time, H, W)
with values in ``[-1, 1]`` (a pixel value ``p`` in ``[0, 1]`` is stored as ``2p - 1``).

The module also holds the checks that read any video back (``detect_attributes``,
``adherence``); they are written to survive blur and noise so that they can measure the
prompt adherence of generated videos.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

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
_TEMPLATE_SUPERSAMPLING = 4
_TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian sigmas (px) tried by the shape fit
_TEMPLATE_MARGIN = 3  # px around the blob box compared with the templates


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


# ----------------------------------------------------------------------------- detection


def _to_numpy(video: Any) -> np.ndarray:
    """A numpy float array from a numpy array or torch tensor (no torch import needed)."""
    if hasattr(video, "detach"):
        video = video.detach().cpu().float().numpy()
    return np.asarray(video, dtype=np.float64)


def _border_median(frame: np.ndarray) -> np.ndarray:
    """Median colour (3,) of the outermost ring of pixels of a (3, H, W) frame."""
    ring = [frame[:, 0, :], frame[:, -1, :], frame[:, 1:-1, 0], frame[:, 1:-1, -1]]
    return np.median(np.concatenate(ring, axis=1), axis=1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (must not be empty).

    Every pixel takes the smallest pixel index among its neighbours until nothing changes;
    then each component carries one label.
    """
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
        updated = np.where(mask, np.minimum.reduce([labels, *neighbours]), outside)
        if np.array_equal(updated, labels):
            break
        labels = updated
    label_ids, sizes = np.unique(labels[mask], return_counts=True)
    return labels == label_ids[np.argmax(sizes)]


def _foreground_mask(distance: np.ndarray) -> np.ndarray:
    """Pixels far from the background: half of the robust peak distance, largest blob.

    Falls back to the top-k most different pixels when nothing passes the threshold.
    """
    peak = np.percentile(distance, 98)
    threshold = max(0.25, 0.5 * peak)
    mask = distance > threshold
    if not mask.any():
        top_k = max(1, distance.size // 25)
        flat = np.zeros(distance.size, dtype=bool)
        flat[np.argsort(distance, axis=None, kind="stable")[-top_k:]] = True
        mask = flat.reshape(distance.shape)
    return _largest_component(mask)


@dataclass
class _FrameForeground:
    """What the detector reads from one frame."""

    background: np.ndarray  # (3,) in [-1, 1]
    color_offset: np.ndarray  # (3,) mean colour of the blob core minus background
    centroid: np.ndarray  # (2,) as (x, y)
    shape_errors: np.ndarray  # (len(SHAPES), len(_TEMPLATE_BLURS)) template misfit


def _frame_foreground(frame: np.ndarray) -> _FrameForeground:
    """Separate the shape from the background in a (3, H, W) frame and measure it."""
    background = _border_median(frame)
    offsets = frame - background[:, None, None]
    distance = np.linalg.norm(offsets, axis=0)
    mask = _foreground_mask(distance)
    # The colour is read from the core of the blob (its most different half), where blur
    # and anti-aliasing mix in the least background.
    core = mask & (distance >= np.median(distance[mask]))
    color_offset = offsets[:, core].mean(axis=1)
    # Opacity of the shape colour per pixel: projection on the core colour, so that noise
    # averages out instead of adding up as it does in the distance.
    alpha = np.tensordot(color_offset, offsets, axes=(0, 0)) / (color_offset @ color_offset + 1e-8)
    ys, xs = np.nonzero(mask)
    return _FrameForeground(
        background=background,
        color_offset=color_offset,
        centroid=np.array([xs.mean(), ys.mean()]),
        shape_errors=_shape_errors(alpha, mask),
    )


def _classify_color(color_offset: np.ndarray, background: np.ndarray) -> str:
    """Palette entry whose offset from the background points the same way (cosine)."""
    palette_offsets = 2.0 * np.array(list(COLORS.values())) - 1.0 - background
    norms = np.linalg.norm(palette_offsets, axis=1) * np.linalg.norm(color_offset) + 1e-8
    return list(COLORS)[int(np.argmax(palette_offsets @ color_offset / norms))]


def _classify_direction(centroids: np.ndarray) -> str:
    """Direction of the centroid displacement between the first and last quarter of frames."""
    window = max(1, len(centroids) // 4)
    delta_x, delta_y = centroids[-window:].mean(axis=0) - centroids[:window].mean(axis=0)
    if abs(delta_x) >= abs(delta_y):
        return "right" if delta_x > 0 else "left"
    return "down" if delta_y > 0 else "up"


def _blur_matrix(length: int, sigma: float) -> np.ndarray:
    """(length, length) matrix applying a 1-D Gaussian blur with zero padding."""
    positions = np.arange(length, dtype=float)
    if sigma <= 0:
        return np.eye(length)
    weights = np.exp(-((positions[:, None] - positions[None, :]) ** 2) / (2 * sigma**2))
    return weights / (sigma * np.sqrt(2 * np.pi))


def _box_coordinates(box: slice, window: slice) -> np.ndarray:
    """Supersampled pixel positions along one axis of ``window``, in units of ``box``
    relative to its centre."""
    offsets = (np.arange(_TEMPLATE_SUPERSAMPLING) + 0.5) / _TEMPLATE_SUPERSAMPLING
    positions = (np.arange(window.start, window.stop)[:, None] + offsets).reshape(-1)
    return (positions - (box.start + box.stop) / 2) / (box.stop - box.start)


def _shape_template(
    shape: str, box: tuple[slice, slice], window: tuple[slice, slice]
) -> np.ndarray:
    """Coverage of each pixel of ``window`` by the ideal ``shape`` stretched to fill ``box``."""
    grid_y, grid_x = np.meshgrid(
        _box_coordinates(box[0], window[0]), _box_coordinates(box[1], window[1]), indexing="ij"
    )
    inside = shape_coverage(shape, grid_x, grid_y, 1.0).astype(float)
    samples = _TEMPLATE_SUPERSAMPLING
    window_height, window_width = (axis.stop - axis.start for axis in window)
    return inside.reshape(window_height, samples, window_width, samples).mean(axis=(1, 3))


def _shape_errors(alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Misfit of each (shape, blur) template to the opacity map around the blob.

    Templates fill the blob's bounding box, are blurred by each of ``_TEMPLATE_BLURS``
    and scaled by the least-squares amplitude; the error is the mean squared residual in
    the box grown by a margin. Returns shape (len(SHAPES), len(_TEMPLATE_BLURS)).
    """
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    window = tuple(
        slice(max(0, axis.start - _TEMPLATE_MARGIN), min(length, axis.stop + _TEMPLATE_MARGIN))
        for axis, length in zip(box, mask.shape)
    )
    observed = alpha[window]
    blur_rows = [_blur_matrix(observed.shape[0], sigma) for sigma in _TEMPLATE_BLURS]
    blur_columns = [_blur_matrix(observed.shape[1], sigma) for sigma in _TEMPLATE_BLURS]
    errors = np.zeros((len(SHAPES), len(_TEMPLATE_BLURS)))
    for shape_index, shape in enumerate(SHAPES):
        template = _shape_template(shape, box, window)
        for blur_index in range(len(_TEMPLATE_BLURS)):
            blurred = blur_rows[blur_index] @ template @ blur_columns[blur_index].T
            amplitude = (observed * blurred).sum() / max((blurred * blurred).sum(), 1e-8)
            errors[shape_index, blur_index] = np.mean((observed - amplitude * blurred) ** 2)
    return errors


def detect_attributes(video: Any) -> dict[str, str]:
    """Read colour, shape and direction back from a (3, F, H, W) video in [-1, 1].

    Accepts numpy arrays and torch tensors. Per frame the background is the median colour
    of the border pixels and the shape is the largest blob of pixels far from it. Colour:
    palette entry whose offset from the background best matches the blob core's offset.
    Direction: axis and sign of the centroid displacement from the first to the last
    frames. Shape: the template (square, circle, triangle), possibly blurred, that best
    fits the blob's opacity map, summed over frames.
    """
    array = _to_numpy(video)
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"video must have shape (3, F, H, W), got {tuple(array.shape)}")
    frames = [_frame_foreground(array[:, t]) for t in range(array.shape[1])]
    color_offset = np.mean([f.color_offset for f in frames], axis=0)
    background = np.mean([f.background for f in frames], axis=0)
    shape_errors = np.sum([f.shape_errors for f in frames], axis=0).min(axis=1)
    return {
        "color": _classify_color(color_offset, background),
        "shape": SHAPES[int(np.argmin(shape_errors))],
        "direction": _classify_direction(np.stack([f.centroid for f in frames])),
    }


def adherence(videos: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of videos whose detected attributes match their prompt.

    ``videos`` is a batch (N, 3, F, H, W) (numpy or torch) or a sequence of (3, F, H, W)
    videos. Returns keys "color", "shape", "direction" and "all" (all three match).
    """
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("adherence needs at least one video")
    keys = ("color", "shape", "direction")
    hits = dict.fromkeys((*keys, "all"), 0)
    for video, prompt in zip(videos, prompts):
        expected = parse_prompt(prompt)._asdict()
        detected = detect_attributes(video)
        matches = [detected[key] == expected[key] for key in keys]
        for key, matched in zip(keys, matches):
            hits[key] += int(matched)
        hits["all"] += int(all(matches))
    return {key: count / len(prompts) for key, count in hits.items()}
