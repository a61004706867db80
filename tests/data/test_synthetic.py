"""Tests for the procedural text-to-video generator and its prompt-adherence checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from anyflow_ray.data.synthetic import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    VideoSpec,
    clip_layout,
    parse_prompt,
    render_video,
    sample_specs,
)
from anyflow_ray.evaluation.adherence import adherence, detect_attributes


@pytest.fixture(scope="module")
def specs() -> list[VideoSpec]:
    return sample_specs(96, seed=0)


@pytest.fixture(scope="module")
def clean_videos(specs: list[VideoSpec]) -> np.ndarray:
    return np.stack([render_video(spec) for spec in specs])


def prompts_of(specs: list[VideoSpec]) -> list[str]:
    return [spec.prompt for spec in specs]


def test_palette_and_vocabulary() -> None:
    assert set(COLORS) == {"red", "green", "blue", "yellow"}
    assert SHAPES == ("square", "circle", "triangle")
    assert DIRECTIONS == ("left", "right", "up", "down")
    rgb = np.array(list(COLORS.values()))
    assert rgb.min() >= 0 and rgb.max() <= 1
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0.5


def test_prompt_round_trip() -> None:
    spec = VideoSpec("red", "circle", "left", seed=3)
    assert spec.prompt == "a red circle moving left"
    assert parse_prompt(spec.prompt) == ("red", "circle", "left")
    assert parse_prompt(spec.prompt).shape == "circle"


@pytest.mark.parametrize(
    "prompt", ["a red circle", "a purple circle moving left", "a red blob moving up", ""]
)
def test_parse_prompt_rejects_other_text(prompt: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(prompt)


def test_spec_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError, match="shape"):
        VideoSpec("red", "hexagon", "left", seed=0)


def test_sample_specs_deterministic_and_balanced() -> None:
    assert sample_specs(50, seed=1) == sample_specs(50, seed=1)
    assert sample_specs(50, seed=1) != sample_specs(50, seed=2)
    specs = sample_specs(96, seed=4)
    combos = Counter((s.color, s.shape, s.direction) for s in specs)
    assert len(combos) == 48 and set(combos.values()) == {2}
    assert len({s.seed for s in specs}) == 96


def test_render_is_deterministic_in_seed() -> None:
    spec = VideoSpec("blue", "triangle", "up", seed=11)
    first, again = render_video(spec), render_video(spec)
    assert first.dtype == np.float32 and first.shape == (3, 8, 16, 16)
    np.testing.assert_array_equal(first, again)
    other = render_video(VideoSpec("blue", "triangle", "up", seed=12))
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("frames,height,width", [(8, 16, 16), (4, 8, 8), (16, 32, 48), (5, 64, 64)])
def test_render_range_and_containment(frames: int, height: int, width: int) -> None:
    palette = {tuple(np.float32(2 * np.asarray(rgb) - 1)) for rgb in COLORS.values()}
    for spec in sample_specs(24, seed=5):
        video = render_video(spec, frames=frames, height=height, width=width)
        assert video.shape == (3, frames, height, width)
        assert video.min() >= -1 and video.max() <= 1
        shape_color = tuple(np.float32(2 * np.asarray(COLORS[spec.color]) - 1))
        assert shape_color in palette
        is_shape = np.all(video == np.asarray(shape_color)[:, None, None, None], axis=0)
        boxes = np.array([_box_size(frame_mask) for frame_mask in is_shape])
        # The whole shape is visible in every frame: its box is never cut by a border
        # (pixel-centre sampling can change it by one pixel).
        assert np.all(boxes.max(axis=0) - boxes.min(axis=0) <= 2)
        side = min(height, width)
        assert 0.3 * side <= boxes.max() <= 0.5 * side


@pytest.mark.parametrize("frames,height,width", [(8, 16, 16), (4, 8, 8), (16, 32, 48), (9, 64, 24)])
def test_layout_keeps_the_whole_shape_inside(frames: int, height: int, width: int) -> None:
    for spec in sample_specs(96, seed=6):
        size, centres, background = clip_layout(spec, frames, height, width)
        assert centres.shape == (frames, 2)
        assert 0.40 * min(height, width) <= size <= 0.45 * min(height, width)
        assert np.all(centres - size / 2 >= 0)
        assert np.all(centres + size / 2 <= np.array([width, height]))
        travel = np.abs(centres[-1] - centres[0]).max()
        axis_length = width if spec.direction in ("left", "right") else height
        assert 0.40 * axis_length - 1e-9 <= travel <= 0.50 * axis_length + 1e-9
        steps = np.diff(centres, axis=0)
        np.testing.assert_allclose(steps, steps[:1].repeat(len(steps), axis=0))  # constant speed
        assert 0.02 <= background.min() and background.max() <= 0.28
        assert np.ptp(background) <= 0.06  # nearly grey

def _box_size(mask: np.ndarray) -> tuple[int, int]:
    """Height and width of the bounding box of a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask)
    assert len(ys) > 0, "shape missing from a frame"
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_render_moves_the_named_way() -> None:
    for direction, axis, sign in [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)]:
        spec = VideoSpec("green", "square", direction, seed=7)
        video = render_video(spec, frames=8, height=32, width=32)
        is_shape = np.linalg.norm(video - video[:, :, :1, :1], axis=0) > 0.5
        first = np.mean(np.nonzero(is_shape[0]), axis=1)
        last = np.mean(np.nonzero(is_shape[-1]), axis=1)
        displacement = (last - first)[axis] * sign
        assert 0.35 * 32 <= displacement <= 0.55 * 32
        assert abs((last - first)[1 - axis]) < 1e-6


@pytest.mark.parametrize("argument,kwargs", [("height", {"height": 6}), ("width", {"width": 4}),
                                             ("frames", {"frames": 1})])
def test_render_rejects_too_small_sizes(argument: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=argument):
        render_video(VideoSpec("red", "square", "up", seed=0), **kwargs)


def test_checks_are_exact_on_clean_renders(specs, clean_videos) -> None:
    scores = adherence(clean_videos, prompts_of(specs))
    assert scores == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}


def test_checks_accept_torch_and_lists(specs, clean_videos) -> None:
    tensor = torch.from_numpy(clean_videos[:8])
    assert detect_attributes(tensor[0]) == parse_prompt(specs[0].prompt)._asdict()
    assert adherence(list(tensor), prompts_of(specs[:8]))["all"] == 1.0


def test_checks_survive_noise(specs, clean_videos) -> None:
    noise = np.random.default_rng(0).normal(0.0, 0.1, clean_videos.shape)
    scores = adherence(clean_videos + noise.astype(np.float32), prompts_of(specs))
    assert scores["color"] >= 0.95 and scores["direction"] >= 0.95
    assert scores["shape"] >= 0.95


def test_checks_survive_blur(specs, clean_videos) -> None:
    kernel = torch.tensor([0.25, 0.5, 0.25])
    videos = torch.from_numpy(clean_videos)
    blurred = videos.clone()
    for dim in (-1, -2):
        padded = torch.cat([blurred.narrow(dim, 0, 1), blurred, blurred.narrow(dim, -1, 1)], dim)
        length = blurred.shape[dim]
        blurred = sum(w * padded.narrow(dim, i, length) for i, w in enumerate(kernel))
    scores = adherence(blurred, prompts_of(specs))
    assert scores["color"] == 1.0 and scores["direction"] == 1.0
    assert scores["shape"] >= 0.95


def test_checks_do_not_pass_noise_or_empty_videos(specs, clean_videos) -> None:
    prompts = prompts_of(specs)
    noise = np.random.default_rng(1).uniform(-1, 1, clean_videos.shape)
    noise_scores = adherence(noise, prompts)
    assert noise_scores["all"] < 0.15
    assert max(noise_scores[key] for key in ("color", "shape", "direction")) < 0.6
    background_only = np.broadcast_to(clean_videos[:, :, :, :1, :1], clean_videos.shape)
    background_scores = adherence(background_only, prompts)
    assert background_scores["all"] < 0.15
    assert max(background_scores[key] for key in ("color", "shape", "direction")) < 0.6


def test_adherence_rejects_mismatched_lengths(clean_videos) -> None:
    with pytest.raises(ValueError, match="prompts"):
        adherence(clean_videos[:2], ["a red square moving up"])
