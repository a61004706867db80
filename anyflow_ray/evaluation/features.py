"""A Fréchet video distance for the synthetic benchmark (docs/method.md §8, "Evaluation").

Pixel SWD sees colour and brightness but hardly shape or motion. FVD measures video quality as the
Fréchet distance between Gaussians fitted to the features of a video classifier (I3D, trained on
Kinetics). This is its tiny analogue: a small 3D conv net trained once on the synthetic data's own
labels (colour, shape and direction, read from the prompts), whose penultimate features are compared
with ``frechet_distance``; its three heads also give a learned prompt adherence beside the hand-written
detector of ``data/synthetic.py``.

The classifier is cached with the data it was trained on, in ``<data.root>/feature_classifier/``:
``model.safetensors`` and ``classifier.json`` (architecture, attribute vocabulary, the training data's
fingerprint, the weights' sha256, the held-out accuracy), written each under a temporary name and
renamed, the json last, so a crash leaves no half cache that loads. ``classifier_for`` reuses the cache
only when everything it records matches the data and the code; otherwise it trains anew (well under a
minute on one CPU core for the tiny data) and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from anyflow_ray.data.shard_writer import write_atomically
from anyflow_ray.data.shards import read_shards
from anyflow_ray.data.synthetic import COLORS, DIRECTIONS, SHAPES, parse_prompt

CACHE_DIR = "feature_classifier"
WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "classifier.json"
FORMAT_VERSION = 1
ATTRIBUTES = ("color", "shape", "direction")
VOCAB: dict[str, list[str]] = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
# Conv widths and the feature width D. D is kept small: the evaluation fits D x D covariances to 64-256
# clips, and a Fréchet distance from fewer clips than dimensions is mostly estimation noise.
CHANNELS = (8, 32, 64)
_STRIDES = (1, (1, 2, 2), 2)  # full resolution first (shape is in 1-pixel details), then down to a quarter
FEATURE_DIM = 32
TRAINING = {"epochs": 8, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0, "noise_std": 0.1}
_INFER_BATCH = 256
_DECODE_BATCH = 32
_PROBE_CLIPS = 2  # latent data: decoded clips hashed into the fingerprint, so a new VAE retrains too

ToPixels = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- Fréchet distance


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by ``eigh`` (round-off negatives -> 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a_features: torch.Tensor | np.ndarray, b_features: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D):
    ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2)``, in float64.

    ``Tr (C_a C_b)^1/2`` is computed as ``Tr (S C_b S)^1/2`` with ``S = C_a^1/2``: the same eigenvalues
    (``C_a C_b`` is similar to ``S C_b S``), but a symmetric PSD matrix that ``eigh`` takes apart stably,
    where a general matrix square root of ``C_a C_b`` (scipy's ``sqrtm``) can return complex round-off.
    """
    sets = []
    for name, features in (("a_features", a_features), ("b_features", b_features)):
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2 samples, got shape {tuple(x.shape)}")
        sets.append(x)
    a, b = sets
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: a_features {tuple(a.shape)} vs b_features {tuple(b.shape)}")
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(distance.clamp(min=0))


# ----------------------------------------------------------------------------- the classifier


class _MeanMaxPool(nn.Module):
    """(B, C, F, H, W) -> (B, 2C): the mean and the maximum of each channel over time and space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)


class VideoFeatureClassifier(nn.Module):
    """A small 3D conv net on (B, C, F, H, W) videos in [-1, 1]: three 3x3x3 conv blocks (the second
    halves space, the third time and space), global mean and max pooling, a D-wide feature layer and
    one linear head per attribute.

    Global pooling makes the features independent of where the shape is; motion is seen by the
    3x3x3 kernels (frame to frame), so direction survives the pooling. The max keeps the few
    positions where a corner detector fires (a square's corner, a circle's stair steps), which the
    mean alone dilutes: with mean pooling only, one clip in ten had its shape wrong. Any input size
    works; the size it was trained on is ``input_shape``, and ``features``/``adherence`` refuse others.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = CHANNELS,
                 feature_dim: int = FEATURE_DIM):
        super().__init__()
        if len(input_shape) != 4 or not all(int(size) > 0 for size in input_shape):
            raise ValueError(f"input_shape must be (C, F, H, W) with positive sizes, got {list(input_shape)}")
        self.input_shape = tuple(int(size) for size in input_shape)
        self.record: dict = {}  # the cache's classifier.json once saved or loaded
        blocks, width = [], self.input_shape[0]
        for out, stride in zip(channels, _STRIDES):
            blocks += [nn.Conv3d(width, out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU()]
            width = out
        self.encoder = nn.Sequential(*blocks, _MeanMaxPool(), nn.Linear(2 * width, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({key: nn.Linear(feature_dim, len(VOCAB[key])) for key in ATTRIBUTES})

    @property
    def architecture(self) -> dict:
        """What rebuilds this network (and what a cache must match)."""
        convs = [m for m in self.encoder if isinstance(m, nn.Conv3d)]
        return {"input_shape": list(self.input_shape), "channels": [c.out_channels for c in convs],
                "feature_dim": self.encoder[-2].out_features}

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, each (B, len(VOCAB[attribute]))."""
        features = self.encoder(videos)
        return {key: head(features) for key, head in self.heads.items()}

    def _check_videos(self, videos: torch.Tensor | np.ndarray) -> torch.Tensor:
        videos = torch.as_tensor(videos)
        if videos.ndim != 5 or tuple(videos.shape[1:]) != self.input_shape:
            raise ValueError(f"videos must be (B, {', '.join(map(str, self.input_shape))}) (the size the "
                             f"feature classifier was trained on), got {tuple(videos.shape)}")
        return videos

    @torch.no_grad()
    def _batched(self, videos: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        outs = [fn(videos[i:i + _INFER_BATCH].to(device, torch.float32)).cpu()
                for i in range(0, len(videos), _INFER_BATCH)]
        self.train(was_training)
        return torch.cat(outs)

    def features(self, videos: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, D) float32 penultimate features on the CPU, for ``frechet_distance``; videos (B, C, F, H, W)
        in [-1, 1] on any device."""
        return self._batched(self._check_videos(videos), self.encoder)

    def predict(self, videos: torch.Tensor | np.ndarray) -> dict[str, list[str]]:
        """The attribute names the heads pick for each video."""
        features = self.features(videos)
        with torch.no_grad():
            return {key: [VOCAB[key][i] for i in self.heads[key](features.to(self.heads[key].weight)).argmax(1)]
                    for key in ATTRIBUTES}

    def adherence(self, videos: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """Fraction of videos whose predicted colour / shape / direction / all three match their prompt:
        the learned counterpart of ``evaluation.adherence.adherence`` (same keys)."""
        if len(videos) != len(prompts) or len(prompts) == 0:
            raise ValueError(f"adherence needs as many prompts as videos (at least one), got "
                             f"{len(videos)} videos and {len(prompts)} prompts")
        labels = prompt_labels(prompts)
        predicted = self.predict(videos)
        hits = torch.stack([torch.tensor([VOCAB[key].index(name) for name in predicted[key]]) == labels[key]
                            for key in ATTRIBUTES])
        scores = {key: float(hit.float().mean()) for key, hit in zip(ATTRIBUTES, hits)}
        return {**scores, "all": float(hits.all(dim=0).float().mean())}


def prompt_labels(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Class indices (N,) per attribute from the prompts (``parse_prompt`` names a bad one)."""
    parsed = [parse_prompt(prompt) for prompt in prompts]
    return {key: torch.tensor([VOCAB[key].index(getattr(p, key)) for p in parsed]) for key in ATTRIBUTES}


def _direction_map(mapping: dict[str, str]) -> torch.Tensor:
    """Direction class indices after a flip that renames directions by ``mapping`` (others unchanged)."""
    return torch.tensor([VOCAB["direction"].index(mapping.get(name, name)) for name in VOCAB["direction"]])


# Label-preserving flips: a mirror image (W axis) swaps left and right and keeps every shape (all are
# symmetric about the vertical axis; the triangle's apex points up, so an upside-down flip would not);
# time reversal turns every direction around.
MIRRORED = _direction_map({"left": "right", "right": "left"})
REVERSED = _direction_map({"left": "right", "right": "left", "up": "down", "down": "up"})


def _augment(clips: torch.Tensor, labels: dict[str, torch.Tensor], noise_std: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random mirror and time reversal per clip (with their direction labels), then Gaussian pixel noise
    of a random strength up to ``noise_std``: generated samples are noisier than the rendered clips,
    and their features should not jump for it."""
    direction = labels["direction"]
    for axis, remap in ((-1, MIRRORED), (2, REVERSED)):
        flip = torch.rand(len(clips)) < 0.5
        clips = torch.where(flip.view(-1, 1, 1, 1, 1).to(clips.device), clips.flip(axis), clips)
        direction = torch.where(flip, remap[direction], direction)
    strength = torch.rand(len(clips), 1, 1, 1, 1) * noise_std
    clips = clips + (strength * torch.randn(clips.shape)).to(clips.device)
    return clips, {**labels, "direction": direction}


def train_classifier(videos: torch.Tensor, prompts: Sequence[str], device: str | torch.device = "cpu",
                     progress: bool = False, epochs: int | None = None) -> VideoFeatureClassifier:
    """Train a classifier on pixel videos (N, C, F, H, W) in [-1, 1] labelled by their prompts:
    AdamW with a cosine learning rate, the sum of the three heads' cross-entropies, ``_augment``, and a
    fixed seed (the caller's RNG state is left as it was). ``epochs`` defaults to ``TRAINING["epochs"]``."""
    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or len(videos) != len(prompts) or len(prompts) < 2:
        raise ValueError(f"training needs videos (N, C, F, H, W) and N >= 2 matching prompts, got videos "
                         f"{tuple(videos.shape)} and {len(prompts)} prompts")
    labels = prompt_labels(prompts)
    device, epochs = torch.device(device), TRAINING["epochs"] if epochs is None else epochs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAINING["seed"])
        model = VideoFeatureClassifier(videos.shape[1:]).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"])
        batches = [rows for _ in range(epochs) for rows in torch.randperm(len(videos)).split(TRAINING["batch_size"])]
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(batches))
        for rows in tqdm(batches, desc="training the feature classifier", disable=not progress, leave=False):
            clips, targets = _augment(videos[rows].to(device, torch.float32),
                                      {key: labels[key][rows] for key in ATTRIBUTES}, TRAINING["noise_std"])
            logits = model(clips)
            loss = sum(F.cross_entropy(logits[key], targets[key].to(device)) for key in ATTRIBUTES)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


# ----------------------------------------------------------------------------- the cache


def _fingerprint(videos: torch.Tensor, prompts: Sequence[str], probe: torch.Tensor | None = None) -> str:
    """sha256 of the training clips (values and shape), their prompts and, for latent data, a few decoded
    clips quantised to 8 bits (so that a different VAE counts as different data)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(videos.shape)).encode())
    digest.update(videos.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update("\n".join(prompts).encode())
    if probe is not None:
        quantised = ((probe.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        digest.update(quantised.numpy().tobytes())
    return digest.hexdigest()


def _decode(latents: torch.Tensor, to_pixels: ToPixels, device: torch.device) -> torch.Tensor:
    """Latents (N, ...) -> pixel videos (N, 3, F, H, W) on the CPU, in batches, without grad."""
    with torch.no_grad():
        return torch.cat([to_pixels(latents[i:i + _DECODE_BATCH].to(device)).float().cpu()
                          for i in range(0, len(latents), _DECODE_BATCH)])


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cached(folder: Path, fingerprint: str, input_shape: tuple[int, ...],
                 device: torch.device) -> VideoFeatureClassifier | None:
    """The cached classifier when its record matches this data and this code in every respect, else None."""
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
        expected = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "vocab": VOCAB,
                    "architecture": {"input_shape": list(input_shape), "channels": list(CHANNELS),
                                     "feature_dim": FEATURE_DIM}, "training": TRAINING}
        if any(record.get(key) != value for key, value in expected.items()):
            return None
        if _sha256_file(folder / WEIGHTS_NAME) != record["weights_sha256"]:
            return None
        model = VideoFeatureClassifier(input_shape)
        model.load_state_dict(load_file(folder / WEIGHTS_NAME))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None  # missing, unreadable or from another version: retrain
    model.record = record
    return model.to(device).eval()


def _save(model: VideoFeatureClassifier, folder: Path, record: dict) -> None:
    """Weights first, the record (with the weights' sha256) last: a record always names complete weights."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_NAME, lambda temp: save_file(state, temp))
    record = {**record, "weights_sha256": _sha256_file(folder / WEIGHTS_NAME)}
    write_atomically(folder / RECORD_NAME, lambda temp: temp.write_text(json.dumps(record, indent=2)))
    model.record = record


def _heldout_pixels(root: Path, input_shape: tuple[int, ...], to_pixels: ToPixels | None,
                    device: torch.device) -> tuple[torch.Tensor, list[str]] | None:
    """``<root>/heldout`` as pixel videos of the classifier's size, or None when there is none to use."""
    if not (root / "heldout").is_dir():
        return None
    heldout = read_shards(root / "heldout")
    videos = heldout.videos if to_pixels is None else _decode(heldout.videos, to_pixels, device)
    if tuple(videos.shape[1:]) != input_shape:
        return None
    return videos, heldout.prompts


def classifier_for(data_root: str | Path, train_videos: torch.Tensor | np.ndarray | None = None,
                   train_prompts: Sequence[str] | None = None, device: str | torch.device = "cpu",
                   progress: bool = False, to_pixels: ToPixels | None = None) -> VideoFeatureClassifier:
    """The feature classifier of the data set at ``data_root``: loaded from
    ``<data_root>/feature_classifier/`` when that was trained on exactly this data by this code, else
    trained on it and written there.

    The training clips are ``train_videos``/``train_prompts`` when given (pixel videos), else the
    training shards ``<data_root>/train``. With ``to_pixels`` (a latent model's VAE decode, to pixels in
    [-1, 1]) the shards are latents and are decoded first: the classifier always sees pixels, the same
    pixels an evaluation decodes its samples to. Accuracy on ``<data_root>/heldout`` (decoded alike) is
    measured after training and kept in ``classifier.record["heldout_accuracy"]``.
    """
    root, device = Path(data_root), torch.device(device)
    probe = None
    if train_videos is None:
        if train_prompts is not None:
            raise ValueError("train_prompts was given without train_videos")
        train = read_shards(root / "train")
        train_videos, train_prompts = train.videos, train.prompts
        if to_pixels is not None:
            probe = _decode(train_videos[:_PROBE_CLIPS], to_pixels, device)
        elif train_videos.shape[1] != 3:
            raise ValueError(f"{root / 'train'} holds latents {tuple(train_videos.shape[1:])}, not pixel "
                             "videos (3, F, H, W): pass to_pixels (the VAE decode) or train_videos")
    elif train_prompts is None or len(train_prompts) != len(train_videos):
        raise ValueError(f"train_videos ({len(train_videos)} clips) needs as many train_prompts, got "
                         f"{None if train_prompts is None else len(train_prompts)}")
    train_videos, train_prompts = torch.as_tensor(train_videos), list(train_prompts)
    input_shape = tuple((train_videos if probe is None else probe).shape[1:])
    if len(input_shape) != 4 or input_shape[0] != 3:
        raise ValueError(f"the feature classifier reads pixel videos (N, 3, F, H, W), got clips {input_shape}")
    fingerprint = _fingerprint(train_videos, train_prompts, probe)
    folder = root / CACHE_DIR
    cached = _load_cached(folder, fingerprint, input_shape, device)
    if cached is not None:
        return cached
    if probe is not None:
        train_videos = _decode(train_videos, to_pixels, device)
    start = time.perf_counter()
    model = train_classifier(train_videos, train_prompts, device, progress)
    seconds = time.perf_counter() - start
    heldout = _heldout_pixels(root, input_shape, to_pixels, device)
    record = {"format": FORMAT_VERSION, "architecture": model.architecture, "vocab": VOCAB, "training": TRAINING,
              "fingerprint": fingerprint, "train_clips": len(train_prompts), "train_seconds": round(seconds, 1),
              "heldout_accuracy": None if heldout is None else model.adherence(*heldout)}
    _save(model, folder, record)
    return model
