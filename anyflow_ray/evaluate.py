"""Quality-vs-steps metrics, tables and plots.

For each model and step budget N, from the same noise and prompts:
  (a) ``ode_rmse``: RMS distance of the N-step sample to the teacher's many-step ODE solution,
  (b) ``swd``: sliced Wasserstein-2 distance between the samples and held-out real videos,
  (c) prompt adherence (colour, shape, direction, all) from the synthetic generator's checks.
Lower (a), (b) and higher (c) are better.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anyflow_ray.data.synthetic import adherence
from anyflow_ray.models.flowmap import is_flow_map
from anyflow_ray.sampling import sample


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
def batched_sample(model, noise, contexts, num_steps, shift, guidance, uncond, batch_size) -> torch.Tensor:
    """``sample`` over the batch in chunks of ``batch_size`` (same result as one big batch)."""
    outs = [sample(model, noise[i:i + batch_size], contexts[i:i + batch_size], num_steps, shift, guidance, uncond)
            for i in range(0, noise.shape[0], batch_size)]
    return torch.cat(outs)


def evaluate_model(name: str, model: torch.nn.Module, noise: torch.Tensor, contexts: torch.Tensor,
                   prompts: list[str], uncond: torch.Tensor, reference: torch.Tensor, heldout: torch.Tensor,
                   steps: list[int], shift: float, guidance: float, batch_size: int = 32,
                   swd_projections: int = 256, progress=None, to_pixels=None) -> list[StepResult]:
    """ODE distance and SWD where the model works (pixels or latents); adherence on pixels in [-1, 1]
    (``to_pixels`` decodes latents: the VAE of a latent-space model)."""
    rows = []
    for n in steps:
        out = batched_sample(model, noise, contexts, n, shift, guidance, uncond, batch_size)
        acc = adherence(out if to_pixels is None else to_pixels(out), prompts)
        rows.append(StepResult(model=name, steps=n, ode_rmse=ode_rmse(out, reference),
                               swd=sliced_wasserstein(out, heldout, swd_projections), **acc))
        if progress is not None:
            progress(rows[-1])
    return rows


def format_table(rows: list[StepResult]) -> str:
    """A Markdown table, one line per (model, steps)."""
    head = "| model | steps | ODE RMSE ↓ | SWD ↓ | colour ↑ | shape ↑ | direction ↑ | all ↑ |\n|---|---|---|---|---|---|---|---|"
    lines = [f"| {r.model} | {r.steps} | {r.ode_rmse:.4f} | {r.swd:.4f} | {r.color:.2f} | {r.shape:.2f} | "
             f"{r.direction:.2f} | {r.all:.2f} |" for r in rows]
    return "\n".join([head, *lines])


def write_results(rows: list[StepResult], out_dir: str | Path, meta: dict) -> dict[str, Path]:
    """results.json, results.md and quality_vs_steps.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "quality_vs_steps.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    paths["md"].write_text(format_table(rows) + "\n")
    plot_results(rows, paths["png"])
    return paths


def plot_results(rows: list[StepResult], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ode_rmse", "distance to teacher ODE (RMSE) ↓"), ("swd", "sliced W2 to held-out data ↓"),
               ("all", "prompt adherence (all attributes) ↑")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8))
    for ax, (key, title) in zip(axes, metrics):
        for model in dict.fromkeys(r.model for r in rows):
            pts = sorted((r.steps, getattr(r, key)) for r in rows if r.model == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps N")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
