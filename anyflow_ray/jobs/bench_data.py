"""`anyflow-ray bench` section ``data_scale``: one reader's peak resident memory and rows/s as the data set grows.

Data sets of 2k, 20k and 200k tiny rows (a (3, 2, 8, 8) clip and a (4, 16) embedding: 1.7 KiB a row;
200k rows are 330 MiB) in shards of 2,000 rows and row groups of 64. Each reader runs in a fresh process
that reads one epoch: the data stream (``data.rank_shards``, ``data/stream.py``: one rank of one, a
window of 4 row groups) and, for contrast, ``read_shards`` (the whole data set in memory). The growth of
the process's peak resident memory (VmHWM, reset after imports and the stream's index) is the figure;
rows/s is the epoch's rows over its wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (2_000, 20_000, 200_000)
VIDEO, EMBEDDING = (3, 2, 8, 8), (4, 16)
SHARD_ROWS, ROW_GROUP, WINDOW = 2_000, 64, 4


def measure(sizes: tuple[int, ...] = SIZES, tmp: str | None = None) -> dict:
    """{rows: {"stream": {...}, "memory": {...}}} for each size, and the ratio of the stream's peaks."""
    from anyflow_ray.data.shard_writer import write_shards

    with tempfile.TemporaryDirectory(prefix="anyflow-bench-data-", dir=tmp) as folder:
        out: dict = {"row_bytes": 4 * (int(np.prod(VIDEO)) + int(np.prod(EMBEDDING))), "row_group_size": ROW_GROUP,
                     "window_row_groups": WINDOW, "sizes": {}}
        rng = np.random.default_rng(0)
        for n in sizes:
            root = Path(folder) / f"rows-{n}"
            videos = rng.uniform(-1, 1, (n, *VIDEO)).astype(np.float32)
            embeddings = rng.standard_normal((n, *EMBEDDING)).astype(np.float32)
            write_shards(root, videos, [f"clip {i}" for i in range(n)], embeddings, list(range(n)),
                         shard_size=SHARD_ROWS, row_group_size=ROW_GROUP)
            del videos, embeddings
            out["sizes"][n] = {how: _reader(root, how) for how in ("stream", "memory")}
            print(f"  {n:>7,d} rows  stream: peak +{out['sizes'][n]['stream']['growth_mib']:7.1f} MiB "
                  f"{out['sizes'][n]['stream']['rows_per_s']:9,.0f} rows/s   in memory: peak "
                  f"+{out['sizes'][n]['memory']['growth_mib']:7.1f} MiB", flush=True)
    first, last = out["sizes"][sizes[0]]["stream"], out["sizes"][sizes[-1]]["stream"]
    out["stream_peak_ratio_largest_over_smallest"] = last["growth_mib"] / max(first["growth_mib"], 1e-9)
    return out


def _reader(root: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "anyflow_ray.jobs.bench_data", str(root), how], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


def _read_one_epoch(root: str, how: str) -> dict:
    from anyflow_ray.data.shards import read_shards
    from anyflow_ray.data.stream import RowStream

    stream = RowStream(root, 0, 1, seed=0, window=WINDOW)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak restarts from the current resident size
    base, start = _peak_kib(), time.perf_counter()
    if how == "stream":
        rows = 0
        while rows < len(stream):
            rows += len(stream.rows(rows, min(ROW_GROUP, len(stream) - rows)).prompts)
    else:
        rows = len(read_shards(root))
    seconds = time.perf_counter() - start
    return {"rows": rows, "growth_mib": (_peak_kib() - base) / 1024, "rows_per_s": rows / seconds}


def print_summary(result: dict, needed_rows_per_s: float | None) -> None:
    print(f"  stream peak at {max(result['sizes']):,} rows / at {min(result['sizes']):,}: "
          f"{result['stream_peak_ratio_largest_over_smallest']:.2f}x (goal <= 1.25x)")
    if needed_rows_per_s:
        slowest = min(size["stream"]["rows_per_s"] for size in result["sizes"].values())
        print(f"  slowest stream {slowest:,.0f} rows/s vs {needed_rows_per_s:,.1f} rows/s a tiny learner step consumes "
              f"({slowest / needed_rows_per_s:,.0f}x)")


if __name__ == "__main__":
    print(json.dumps(_read_one_epoch(sys.argv[1], sys.argv[2])))
