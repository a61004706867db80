"""Prompt adherence of videos of the synthetic data (``data/synthetic.py``): colour, shape and direction
read back from any video (``detect_attributes``), and the fraction of a batch that matches its prompts
(``adherence``). Written to survive blur and noise, so that it measures generated videos too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from anyflow_ray.data.synthetic import COLORS, SHAPES, parse_prompt, shape_coverage

_TEMPLATE_SUPERSAMPLING = 4
_TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian sigmas (px) tried by the shape fit
_TEMPLATE_MARGIN = 3  # px around the blob box compared with the templates


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
