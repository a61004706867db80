"""Quality-vs-steps metrics, tables and plots.

For each model and step budget N, from the same noise and prompts:
  (a) ``ode_rmse``: RMS distance of the N-step sample to the teacher's many-step ODE solution,
  (b) ``swd``: sliced Wasserstein-2 distance between the samples and held-out real videos,
  (c) prompt adherence (colour, shape, direction, all) from the synthetic generator's checks.
Lower (a), (b) and higher (c) are better.

A causal student (docs/method.md §6) samples chunk by chunk (``causal_sample``) and is also measured per
chunk: (a) and (b) on each chunk's latent frames (``ChunkResult``), and on a *stream* longer than the
training length from the rolling KV cache, where (b) compares each chunk with every aligned window of the
data of its size (there is no data past the training length to align with).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anyflow_ray.sampling.samplers import causal_sample
from anyflow_ray.evaluation.adherence import adherence
from anyflow_ray.models.causal import chunk_bounds, is_causal
from anyflow_ray.models.flowmap import is_flow_map
from anyflow_ray.sampling.samplers import consistency_sample, sample


@dataclass
class StepResult:
    model: str
    steps: int
    ode_rmse: float
    swd: float
    color: float
    shape: float
    direction: float
    all: float
    fd: float | None = None  # Fréchet distance in the feature classifier's space (video_features.py)
    classifier_all: float | None = None  # that classifier's all-attribute adherence
    sampler: str = "flowmap"  # or "consistency" (predict x0, re-noise): the baseline's own sampler

    @property
    def label(self) -> str:
        return self.model if self.sampler == "flowmap" else f"{self.model} [{self.sampler} sampler]"


@dataclass
class ChunkResult:
    """One chunk's quality: latent frames [start, end); ``streaming`` rows come from a video longer than the
    training length (``ode_rmse`` None: the teacher's reference covers the training length only)."""
    model: str
    steps: int
    chunk: int
    start: int
    end: int
    ode_rmse: float | None
    swd: float
    streaming: bool = False


def data_windows(videos: torch.Tensor, chunks: list[int], size: int) -> torch.Tensor:
    """Every window of ``size`` latent frames that starts on a chunk boundary of the data's clips, stacked:
    the data a streamed chunk of that size is compared with."""
    starts = [a for a, _ in chunk_bounds(chunks, videos.shape[2]) if a + size <= videos.shape[2]]
    return torch.cat([videos[:, :, a:a + size] for a in starts])


def ode_rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-sample RMS difference."""
    diff = (samples.float() - reference.float()).flatten(1)
    return float(diff.pow(2).mean(dim=1).sqrt().mean())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 between two sets of samples (flattened), via quantiles so the set sizes may differ."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample dimensions differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = torch.linspace(0.0, 1.0, max(a.shape[0], b.shape[0]), dtype=torch.float64)
    qa = torch.quantile(a @ directions, levels, dim=0)
    qb = torch.quantile(b @ directions, levels, dim=0)
    return float((qa - qb).pow(2).mean(dim=0).mean().sqrt())


@torch.no_grad()
def batched_sample(model, noise, contexts, num_steps, shift, guidance, uncond, batch_size,
                   cache_chunks: int = 0, sampler: str = "flowmap") -> torch.Tensor:
    """``sample`` over the batch in chunks of ``batch_size`` (same result as one big batch); a causal model
    samples chunk by chunk (``causal_sample``, KV cache of ``cache_chunks`` chunks, 0: all); ``sampler=
    "consistency"``: ``consistency_sample``, its fresh noise seeded per batch (the same for every model)."""
    def one(i, z, c):
        if sampler == "consistency":
            return consistency_sample(model, z, c, num_steps, shift, torch.Generator().manual_seed(i),
                                      guidance, uncond)
        if is_causal(model):
            return causal_sample(model, z, c, num_steps, shift, cache_chunks=cache_chunks, guidance_scale=guidance,
                                 uncond_context=uncond)
        return sample(model, z, c, num_steps, shift, guidance, uncond)

    return torch.cat([one(i, noise[i:i + batch_size], contexts[i:i + batch_size])
                      for i in range(0, noise.shape[0], batch_size)])


def evaluate_model(name: str, model: torch.nn.Module, noise: torch.Tensor, contexts: torch.Tensor,
                   prompts: list[str], uncond: torch.Tensor, reference: torch.Tensor, heldout: torch.Tensor,
                   steps: list[int], shift: float, guidance: float, batch_size: int = 32,
                   swd_projections: int = 256, progress=None, to_pixels=None, chunks: list[int] | None = None,
                   cache_chunks: int = 0, chunk_rows: list[ChunkResult] | None = None, features=None,
                   sampler: str = "flowmap", keep: dict | None = None, keep_count: int = 4) -> list[StepResult]:
    """ODE distance and SWD where the model works (pixels or latents); adherence on pixels in [-1, 1]
    (``to_pixels`` decodes latents: the VAE of a latent-space model). With ``chunks`` (a causal config),
    the same samples are measured per chunk too, appended to ``chunk_rows``. ``features``: a
    ``FeatureScore`` (Fréchet distance and adherence of the data's feature classifier). ``keep``: gets the
    pixels of the first ``keep_count`` prompts at every step count, keyed by (row label, steps)."""
    rows = []
    for n in steps:
        out = batched_sample(model, noise, contexts, n, shift, guidance, uncond, batch_size, cache_chunks, sampler)
        pixels = out if to_pixels is None else to_pixels(out)
        scores = features.score(pixels, prompts) if features is not None else {}
        rows.append(StepResult(model=name, steps=n, ode_rmse=ode_rmse(out, reference),
                               swd=sliced_wasserstein(out, heldout, swd_projections), **adherence(pixels, prompts),
                               **scores, sampler=sampler))
        if keep is not None:
            keep[(rows[-1].label, n)] = pixels[:keep_count].detach().float().cpu()
        if chunks and chunk_rows is not None:
            chunk_rows += per_chunk(name, n, out, reference, heldout, chunks, swd_projections)
        if progress is not None:
            progress(rows[-1])
    return rows


def per_chunk(name: str, steps: int, out: torch.Tensor, reference: torch.Tensor | None, heldout: torch.Tensor,
              chunks: list[int], swd_projections: int = 256, streaming: bool = False) -> list[ChunkResult]:
    """ODE distance and SWD of each chunk's frames: against the same frames of the reference and of the data;
    ``streaming``: against every aligned window of the data of the chunk's size (no reference)."""
    rows = []
    for j, (a, b) in enumerate(chunk_bounds(chunks, out.shape[2])):
        real = data_windows(heldout, chunks, b - a) if streaming else heldout[:, :, a:b]
        rows.append(ChunkResult(model=name, steps=steps, chunk=j, start=a, end=b,
                                ode_rmse=None if reference is None else ode_rmse(out[:, :, a:b], reference[:, :, a:b]),
                                swd=sliced_wasserstein(out[:, :, a:b], real, swd_projections), streaming=streaming))
    return rows


@torch.no_grad()
def evaluate_stream(name: str, model: torch.nn.Module, noise: torch.Tensor, contexts: torch.Tensor,
                    heldout: torch.Tensor, chunks: list[int], steps: list[int], shift: float, cache_chunks: int,
                    batch_size: int = 32, swd_projections: int = 256, progress=None) -> list[ChunkResult]:
    """Per-chunk SWD of a causal model's videos of ``noise.shape[2]`` latent frames (past the training length),
    made chunk by chunk with a rolling KV cache of ``cache_chunks`` chunks (docs/method.md §6)."""
    rows = []
    for n in steps:
        out = batched_sample(model, noise, contexts, n, shift, 1.0, None, batch_size, cache_chunks)
        rows += per_chunk(name, n, out, None, heldout, chunks, swd_projections, streaming=True)
        if progress is not None:
            progress(rows[-1])
    return rows


class FeatureScore:
    """Fréchet distance to the held-out clips and adherence, in the space of the data's feature classifier."""

    def __init__(self, classifier, heldout_pixels: torch.Tensor):
        from anyflow_ray.evaluation.features import frechet_distance

        self.classifier, self.distance = classifier, frechet_distance
        self.reference = classifier.features(heldout_pixels)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        return {"fd": self.distance(self.classifier.features(pixels), self.reference),
                "classifier_all": self.classifier.adherence(pixels, prompts)["all"]}


def format_table(rows: list[StepResult]) -> str:
    """A Markdown table, one line per (model, sampler, steps); the Fréchet columns when measured."""
    fd = any(r.fd is not None for r in rows)
    head = ("| model | steps | ODE RMSE ↓ | SWD ↓ | " + ("FD ↓ | " if fd else "") + "colour ↑ | shape ↑ | direction ↑ | "
            "all ↑ |" + (" all (classifier) ↑ |" if fd else "") + "\n|---|---|---|---|" + "---|" * (6 if fd else 4))
    lines = [f"| {r.label} | {r.steps} | {r.ode_rmse:.4f} | {r.swd:.4f} | " + (f"{r.fd:.1f} | " if fd else "")
             + f"{r.color:.2f} | {r.shape:.2f} | {r.direction:.2f} | {r.all:.2f} |"
             + (f" {r.classifier_all:.2f} |" if fd else "") for r in rows]
    return "\n".join([head, *lines])


def format_chunk_table(rows: list[ChunkResult], metric: str, title: str) -> str:
    """A Markdown table of ``metric`` per chunk, one line per (model, steps)."""
    chunks = sorted({r.chunk for r in rows})
    head = (f"{title}\n\n| model | steps | " + " | ".join(f"chunk {j + 1}" for j in chunks) + " |\n|---|---|"
            + "---|" * len(chunks))
    table = {}
    for r in rows:
        table.setdefault((r.model, r.steps), {})[r.chunk] = getattr(r, metric)
    lines = [f"| {model} | {steps} | " + " | ".join(f"{values[j]:.4f}" if values.get(j) is not None else "-"
                                                    for j in chunks) + " |"
             for (model, steps), values in table.items()]
    return "\n".join([head, *lines])


def format_chunk_tables(chunk_rows: list[ChunkResult]) -> str:
    """The per-chunk tables of a causal evaluation: ODE RMSE and SWD at the training length, SWD streaming."""
    fixed = [r for r in chunk_rows if not r.streaming]
    stream = [r for r in chunk_rows if r.streaming]
    tables = [format_chunk_table(fixed, "ode_rmse", "ODE RMSE ↓ per chunk (training length)"),
              format_chunk_table(fixed, "swd", "SWD ↓ per chunk (training length, against the data's same frames)")]
    if stream:
        frames = max(r.end for r in stream)
        tables.append(format_chunk_table(stream, "swd", f"SWD ↓ per chunk, streaming {frames} latent frames "
                                                        f"(rolling KV cache, against every aligned data window)"))
    return "\n\n".join(tables)


def write_results(rows: list[StepResult], out_dir: str | Path, meta: dict,
                  chunk_rows: list[ChunkResult] | None = None) -> dict[str, Path]:
    """results.json, results.md and quality_vs_steps.png in ``out_dir``; with ``chunk_rows`` (a causal
    evaluation) also their tables, ``chunk_rows`` in the JSON and quality_per_chunk.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "quality_vs_steps.png"}
    record = {"meta": meta, "rows": [asdict(r) for r in rows]}
    text = format_table(rows)
    if chunk_rows:
        record["chunk_rows"] = [asdict(r) for r in chunk_rows]
        text += "\n\n" + format_chunk_tables(chunk_rows)
        paths["chunks_png"] = out / "quality_per_chunk.png"
        plot_chunks(chunk_rows, paths["chunks_png"])
    paths["json"].write_text(json.dumps(record, indent=2))
    paths["md"].write_text(text + "\n")
    plot_results(rows, paths["png"])
    return paths


def plot_results(rows: list[StepResult], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ode_rmse", "distance to teacher ODE (RMSE) ↓"), ("swd", "sliced W2 to held-out data ↓"),
               ("fd", "Fréchet distance (feature classifier) ↓"), ("all", "prompt adherence (all attributes) ↑")]
    metrics = [(key, title) for key, title in metrics if any(getattr(r, key) is not None for r in rows)]
    teacher = [r for r in rows if r.model == "teacher" and r.sampler == "flowmap"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8))
    for ax, (key, title) in zip(axes, metrics):
        for label in dict.fromkeys(r.label for r in rows):
            pts = sorted((r.steps, getattr(r, key)) for r in rows if r.label == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if teacher:  # the teacher's many-step level, what a few-step student should reach
            best = max(teacher, key=lambda r: r.steps)
            ax.axhline(getattr(best, key), color="grey", linestyle="--", linewidth=1,
                       label=f"teacher, {best.steps} steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps N")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_chunks(chunk_rows: list[ChunkResult], path: str | Path) -> None:
    """SWD per chunk at each model's largest step count: at the training length and streaming (a dashed line
    marks where the training length ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(False, "SWD per chunk, training length ↓"), (True, "SWD per chunk, streaming ↓")]
    panels = [(mode, title) for mode, title in panels if any(r.streaming == mode for r in chunk_rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    colors = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(r.model for r in chunk_rows))}  # one per model
    for ax, (mode, title) in zip(axes[0], panels):
        rows = [r for r in chunk_rows if r.streaming == mode]
        for model in dict.fromkeys(r.model for r in rows):
            steps = max(r.steps for r in rows if r.model == model)
            pts = sorted((r.chunk + 1, r.swd) for r in rows if r.model == model and r.steps == steps)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} (N={steps})",
                     color=colors[model])
        if mode:
            ax.axvline(max(r.chunk for r in chunk_rows if not r.streaming) + 1.5, color="grey", linestyle="--",
                       linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("chunk")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
