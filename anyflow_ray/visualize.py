"""Writing clips people can look at: GIF/MP4 per clip and a contact sheet of step counts side by side."""

from __future__ import annotations

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


def write_contact_sheet(videos: dict[tuple[str, int], np.ndarray], prompts: list[str], steps: list[int],
                        path: str | Path, title: str = "") -> Path:
    """Rows = prompts, columns = step counts; each cell shows the clip's frames left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(prompts), len(steps), figsize=(2.6 * len(steps), 0.75 * len(prompts) + 0.8),
                             squeeze=False)
    for i, prompt in enumerate(prompts):
        for j, n in enumerate(steps):
            clip = np.clip(videos[(prompt, n)], 0, 1)  # (F, H, W, 3)
            strip = np.concatenate(list(clip), axis=1)
            ax = axes[i][j]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{n} step{'s' if n > 1 else ''}", fontsize=9)
            if j == 0:
                ax.set_ylabel(prompt.replace(" moving", "\nmoving"), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
