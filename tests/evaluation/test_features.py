"""Tests for the Fréchet video distance of the synthetic benchmark: the distance itself, the feature
classifier it reads, and the classifier's cache beside the data (docs/method.md §8, "Evaluation")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import anyflow_ray.evaluation.features as vf
from anyflow_ray.data.shard_writer import write_shards
from anyflow_ray.data.synthetic import render_video, sample_specs
from anyflow_ray.evaluation.adherence import detect_attributes
from anyflow_ray.evaluation.features import classifier_for, frechet_distance, train_classifier

SMALL = (4, 8, 8)  # frames, height, width of the clips the cache tests train on (cheap)


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of 32 tiny clips gain nothing from a second thread, and on a shared 2-core machine its
    waits at every barrier made the training test 10x slower (77 s instead of 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def render(num: int, seed: int, size: tuple[int, int, int] = (8, 16, 16)) -> tuple[torch.Tensor, list[str]]:
    specs = sample_specs(num, seed)
    return torch.from_numpy(np.stack([render_video(spec, *size) for spec in specs])), [s.prompt for s in specs]


def write_split(folder, videos: torch.Tensor, prompts: list[str]) -> None:
    embeddings = torch.zeros(len(prompts), 2, 4)
    write_shards(folder, videos, prompts, embeddings, list(range(len(prompts))), shard_size=64)


def with_moments(mean: np.ndarray, cov: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` samples whose sample mean and (unbiased) sample covariance are exactly ``mean``, ``cov``."""
    z = np.random.default_rng(seed).standard_normal((num, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # whitened: sample covariance I
    return mean + z @ np.linalg.cholesky(cov).T


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((150, 6)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0


def test_frechet_distance_grows_with_a_mean_shift() -> None:
    a = np.random.default_rng(1).standard_normal((300, 4))
    direction = np.array([1.0, -2.0, 0.5, 0.0])
    distances = [frechet_distance(a, a + shift * direction) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(later > earlier for earlier, later in zip(distances, distances[1:]))
    # equal covariances: what is left is exactly the squared shift of the mean
    assert distances[-1] == pytest.approx(4.0 * direction @ direction, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_two_gaussians() -> None:
    """For 2x2 covariances Tr (C_a C_b)^1/2 = sqrt(tr P + 2 sqrt(det P)), P = C_a C_b (its two eigenvalues
    are positive: sqrt(l1) + sqrt(l2) squared is l1 + l2 + 2 sqrt(l1 l2)), a formula independent of the
    eigh route the code takes; the covariances do not commute."""
    mean_a, mean_b = np.array([0.5, -1.0]), np.array([2.0, 0.0])
    cov_a, cov_b = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    product = cov_a @ cov_b
    cross = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    a, b = with_moments(mean_a, cov_a, 50, seed=2), with_moments(mean_b, cov_b, 80, seed=3)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_names_bad_inputs() -> None:
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="b_features must be"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))


# ----------------------------------------------------------------------------- the classifier


def test_flips_keep_the_labels_true() -> None:
    """The augmentation's relabelling agrees with what the detector reads from the flipped clip."""
    videos, prompts = render(8, seed=5)
    for axis, remap in ((-1, vf.MIRRORED), (2, vf.REVERSED)):
        for video, prompt in zip(videos, prompts):
            label = vf.prompt_labels([prompt])["direction"]
            expected = vf.VOCAB["direction"][int(remap[label])]
            assert detect_attributes(video.flip(axis if axis < 0 else axis - 1))["direction"] == expected


def test_classifier_learns_colour_shape_and_direction() -> None:
    videos, prompts = render(192, seed=3, size=(4, 16, 16))
    state = torch.random.get_rng_state()
    model = train_classifier(videos, prompts, epochs=20)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seeded training leaves the caller's RNG alone
    scores = model.adherence(videos, prompts)
    assert min(scores.values()) >= 0.9, scores
    # a clip shown with another prompt is judged wrong on what differs
    wrong = [prompt.replace("moving left", "moving up") if "left" in prompt else prompt for prompt in prompts]
    assert model.adherence(videos, wrong)["direction"] < scores["direction"] - 0.15
    features = model.features(videos)
    assert features.shape == (192, vf.FEATURE_DIM) and features.dtype == torch.float32
    assert frechet_distance(features[:96], features[96:]) < frechet_distance(features, model.features(-videos))
    with pytest.raises(ValueError, match=r"videos must be \(B, 3, 4, 16, 16\)"):
        model.features(videos[:, :, :2])


def test_training_is_deterministic() -> None:
    videos, prompts = render(48, seed=4, size=SMALL)
    first, second = (train_classifier(videos, prompts, epochs=1).state_dict() for _ in range(2))
    assert all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------- the cache


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A tiny pixel data set (train + heldout), one training epoch, and a count of trainings."""
    monkeypatch.setitem(vf.TRAINING, "epochs", 1)
    calls = []
    train = vf.train_classifier

    def counted(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(vf, "train_classifier", counted)
    write_split(tmp_path / "train", *render(96, seed=0, size=SMALL))
    write_split(tmp_path / "heldout", *render(48, seed=1, size=SMALL))
    return tmp_path, calls


def test_cache_is_written_then_reused(data_root) -> None:
    root, calls = data_root
    model = classifier_for(root)
    weights, record = root / vf.CACHE_DIR / vf.WEIGHTS_NAME, root / vf.CACHE_DIR / vf.RECORD_NAME
    assert weights.is_file() and record.is_file() and len(calls) == 1
    assert model.record["architecture"]["input_shape"] == [3, *SMALL]
    assert set(model.record["heldout_accuracy"]) == {"color", "shape", "direction", "all"}
    stamps = weights.stat().st_mtime_ns, record.stat().st_mtime_ns
    again = classifier_for(root)
    assert len(calls) == 1 and (weights.stat().st_mtime_ns, record.stat().st_mtime_ns) == stamps
    videos, _ = render(5, seed=9, size=SMALL)
    assert torch.equal(again.features(videos), model.features(videos))
    assert not list((root / vf.CACHE_DIR).glob(".*tmp*"))  # no temporary file left behind


def test_cache_is_retrained_when_the_data_or_the_weights_change(data_root) -> None:
    root, calls = data_root
    first = classifier_for(root)
    write_split(root / "train", *render(96, seed=7, size=SMALL))  # other clips, same shape
    second = classifier_for(root)
    assert len(calls) == 2 and second.record["fingerprint"] != first.record["fingerprint"]
    write_split(root / "train", *render(96, seed=7, size=(6, 8, 8)))  # another input shape
    third = classifier_for(root)
    assert len(calls) == 3 and third.record["architecture"]["input_shape"] == [3, 6, 8, 8]
    (root / vf.CACHE_DIR / vf.WEIGHTS_NAME).write_bytes(b"not the weights the record names")
    classifier_for(root)
    assert len(calls) == 4
    classifier_for(root)
    assert len(calls) == 4


def test_explicit_training_clips_are_cached_too(data_root) -> None:
    root, calls = data_root
    videos, prompts = render(48, seed=11, size=SMALL)
    classifier_for(root, train_videos=videos, train_prompts=prompts)
    classifier_for(root, train_videos=videos, train_prompts=prompts)
    assert len(calls) == 1
    classifier_for(root)  # the shards are other data
    assert len(calls) == 2
    with pytest.raises(ValueError, match="needs as many train_prompts"):
        classifier_for(root, train_videos=videos, train_prompts=prompts[:3])
    with pytest.raises(ValueError, match=r"reads pixel videos \(N, 3, F, H, W\), got clips \(1, 4, 8, 8\)"):
        classifier_for(root, train_videos=videos[:, :1], train_prompts=prompts)


def test_latent_shards_are_decoded_and_a_new_decoder_retrains(data_root) -> None:
    """Shards holding 4-channel "latents" (pixels plus a channel); the stand-in VAE drops the channel."""
    root, calls = data_root
    for split, num, seed in (("train", 96, 0), ("heldout", 48, 1)):
        pixels, prompts = render(num, seed=seed, size=SMALL)
        write_split(root / split, torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1), prompts)
    with pytest.raises(ValueError, match="holds latents .*pass to_pixels"):
        classifier_for(root)
    model = classifier_for(root, to_pixels=lambda z: z[:, :3])
    assert model.input_shape == (3, *SMALL) and model.record["heldout_accuracy"] is not None
    classifier_for(root, to_pixels=lambda z: z[:, :3])
    assert len(calls) == 1
    classifier_for(root, to_pixels=lambda z: -z[:, :3])
    assert len(calls) == 2
