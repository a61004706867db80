"""Where a student leaves the teacher's ODE along an N-step trajectory, and what that leaves in its clips.

    python tools/trajectory_drift.py RUN_DIR MODEL_DIR [MODEL_DIR ...] [--config configs/tiny.yaml] [--steps 32]

For each pipeline folder: the RMSE between the student's state after step i of an N-step sampler and the
teacher's ODE solution at the same grid time (8 Euler sub-steps per interval), on 32 held-out prompts; then
statistics of its N-step clips next to the held-out data's (spatial total variation, the share of pixels
below -0.9). docs/experiments.md, "Why DMD at weight 1 bends the many-step map". CPU, under a minute.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anyflow_ray.run.config import load_config  # noqa: E402
from anyflow_ray.data.shards import read_shards  # noqa: E402
from anyflow_ray.models.flowmap import call_model  # noqa: E402
from anyflow_ray.pipeline import AnyFlowRayPipeline  # noqa: E402
from anyflow_ray.sampling.schedule import as_batch_time, jump, sampling_grid  # noqa: E402


def clip_stats(x: torch.Tensor) -> str:
    tv = (x[..., 1:] - x[..., :-1]).abs().mean()
    return f"total variation {tv:.4f}, pixels < -0.9: {(x < -0.9).float().mean():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"run.output_dir={args.run_dir}"])
    held = read_shards(Path(cfg.data.root) / "heldout")
    n, steps, shift = 32, args.steps, cfg.schedule.shift
    ctx = held.embeddings[:n].float()
    noise = torch.randn((n, *held.videos.shape[1:]), generator=torch.Generator().manual_seed(7))
    grid = sampling_grid(steps, shift)
    teacher = AnyFlowRayPipeline.from_pretrained(cfg.teacher.output).transformer.eval()
    print(f"held-out data: {clip_stats(held.videos.float())}")
    marks = sorted({1, steps // 4, steps // 2, 3 * steps // 4, steps - 4, steps - 1, steps} - {0})
    with torch.no_grad():
        ref, z = [noise], noise
        for i in range(steps):
            T0, T1 = float(grid[i]), float(grid[i + 1])
            for j in range(8):
                a, b = T0 + (T1 - T0) * j / 8, T0 + (T1 - T0) * (j + 1) / 8
                z = z + (b - a) / 1000 * call_model(teacher, z, as_batch_time(a, n), ctx)
            ref.append(z)
        for path in args.models:
            model = AnyFlowRayPipeline.from_pretrained(path).transformer.eval()
            z, drift = noise, []
            for i in range(steps):
                T, R = as_batch_time(float(grid[i]), n), as_batch_time(float(grid[i + 1]), n)
                z = jump(z, call_model(model, z, T, ctx, R), T, R)
                drift.append(float((z - ref[i + 1]).pow(2).mean().sqrt()))
            print(f"{path}\n  RMSE to the teacher's ODE after step " +
                  ", ".join(f"{i}: {drift[i - 1]:.4f}" for i in marks) + f"\n  its {steps}-step clips: {clip_stats(z)}")


if __name__ == "__main__":
    main()
