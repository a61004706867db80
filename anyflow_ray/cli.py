"""``anyflow-ray <command> --config configs/x.yaml key=value ...``

The config (schema <- YAML <- overrides) is loaded and validated before any command starts, so an
unknown key or a bad value fails at once with a message naming the key.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from anyflow_ray.run.config import ConfigError, load_config

# command -> (module under anyflow_ray.jobs, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("make_tiny", "write a tiny model folder in the diffusers layout (optional OUT argument)"),
    "data": ("data", "render synthetic videos and write Parquet shards"),
    "prepare": ("prepare", "captioned mp4 files -> Wan latents + UMT5 embeddings in Parquet shards (Ray Data)"),
    "teacher": ("teacher", "train the flow-matching teacher from scratch"),
    "pretrain": ("pretrain", "Stage 1: forward flow-map training on the DeepSpeed learner group"),
    "distill": ("distill", "Stage 2: on-policy distillation, rollout actors + buffer + learner group"),
    "export": ("export", "a checkpoint's EMA model as a pipeline folder (CPU; no Ray, no DeepSpeed)"),
    "sample": ("sample", "sample videos for each step count: GIF/MP4 per prompt and a contact sheet"),
    "evaluate": ("evaluate", "quality-vs-steps table, JSON and plot"),
    "bench": ("bench", "benchmarks: learner step time through Ray + DeepSpeed vs a plain PyTorch loop"),
    "bench-scale": ("bench_scale", "real Wan2.1 architecture, random weights (GPU): backward simulation vs "
                    "full rollout, a bf16 training step"),
    "demo": ("demo", "make-tiny -> data -> teacher -> Stage 1 -> Stage 2 -> samples -> evaluation (tiny)"),
}
# command -> help: commands run here (no job module, no Ray, no torch), after the same load_config
LOCAL_COMMANDS: dict[str, str] = {
    "config": "print every resolved config key: its value, schema default and meaning (* marks a value that "
              "differs from its default)",
}


DRY_RUN_JOBS = ("teacher", "pretrain", "distill")  # commands with --dry-run (anyflow_ray/jobs/dry_run.py)
EXIT_MEMORY_PLAN = 3  # --dry-run: the memory plan exceeds run.gpu_memory_gb


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyflow-ray", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    helps = {**{name: help_text for name, (_, help_text) in COMMANDS.items()}, **LOCAL_COMMANDS}
    for name, help_text in helps.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
        cmd.add_argument("--debug", action="store_true", help="show the traceback of an anticipated error "
                         "(a bad config or input, a refused resume) instead of its one-line message")
        if name == "make-tiny":
            cmd.add_argument("out", nargs="?", default=None, help="output folder (default: model.base)")
        if name in DRY_RUN_JOBS:
            cmd.add_argument("--dry-run", action="store_true", help="meta-device models: the per-GPU memory "
                             "plan (refused above run.gpu_memory_gb), no weights, no training")
        if name == "export":
            cmd.add_argument("checkpoint", help="a checkpoint folder (<run>/checkpoints/step-000500), or a run "
                             "folder: its latest checkpoint")
            cmd.add_argument("--out", default=None, help="the pipeline folder to write (default: "
                             "<run>/exports/<step folder>)")
            cmd.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: the run's "
                             "run.export_dtype")
            cmd.add_argument("--lora", action="store_true", help="the trained LoRA adapters alone, in diffusers' "
                             "LoRA format (load_lora_weights on the stage's init pipeline), not the fused model")
        if name == "sample":
            media = cmd.add_mutually_exclusive_group()
            media.add_argument("--image", metavar="PATH", help="a .png/.jpg the video starts from (image-to-video; "
                               "causal models, resized to the model size)")
            media.add_argument("--video", metavar="PATH", help="an .mp4 the video continues (video-to-video; "
                               "causal models, resized to the model size)")
        if name == "bench":
            which = cmd.add_mutually_exclusive_group()
            which.add_argument("--skip-control-plane", action="store_true", help="leave out the control-plane "
                               "simulation (rollouts and learner steps replaced by sleeps, 1-32 actors)")
            which.add_argument("--control-plane-only", action="store_true", help="run only that simulation "
                               "(its result replaces control_plane_sim in bench.json)")
            which.add_argument("--data-scale-only", action="store_true", help="run only the data-path figures "
                               "(2k-200k tiny rows; their result replaces data_scale in bench.json)")
            cmd.add_argument("--actors", default="1,4,16,32", help="rollout actor counts of the simulation "
                             "(default: 1,4,16,32)")
        if name == "bench-scale":
            cmd.add_argument("--steps", default="8,16,50", help="step budgets N compared (default: 8,16,50)")
            cmd.add_argument("--layers", type=int, default=None, help="fewer transformer blocks than the "
                             "architecture's (a quick check on a CPU)")
            cmd.add_argument("--allow-cpu", action="store_true", help="run the full architecture even when "
                             "run.device resolves to the CPU (hours; refused without this flag)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags and positionals first; every remaining ``key=value`` word is a config override."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [word for word in rest if "=" not in word or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (config overrides are key=value)")
    args.overrides = rest
    if args.command == "make-tiny" and args.out and "=" in args.out:  # `make-tiny key=value`: no OUT was given
        args.overrides, args.out = [args.out, *rest], None
    return args


EXIT_INPUT, EXIT_RUNTIME = 2, 1  # a bad config, input or record (the user's to fix) | a failure while running
LINE_LIMIT = 600  # characters of a one-line error (a Ray actor's death notice runs to dozens of lines)


def main(argv: list[str] | None = None) -> int:
    """Run a command. A failure is one line on stderr naming the stage, rank or file and the cause: an
    anticipated error (bad config or input, refused resume, a cluster too small, a damaged checkpoint or
    shard) exits 2; any other (a dead or hung rank, a non-finite loss, a full disk, an unwritable folder, a
    bug) exits 1 and its traceback goes to a file the line names. ``--debug``: the traceback instead."""
    args = parse_args(argv)
    try:
        return _run_command(args)
    except Exception as err:
        if args.debug:
            raise
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"  # the failure is reported here: no dump of it at exit
        cause = err if _anticipated(err) else getattr(err, "cause", None)  # a learner rank's own error
        if _anticipated(cause):
            print(f"anyflow-ray {args.command}: {_one_line(cause)}", file=sys.stderr)
            return EXIT_INPUT
        trace = _save_traceback(args, err)
        line = _one_line(describe_failure(err))
        line = line if len(line) <= LINE_LIMIT else line[:LINE_LIMIT - 3] + "..."
        print(f"anyflow-ray {args.command}: {line} (traceback: {trace}; --debug prints it)", file=sys.stderr)
        return EXIT_RUNTIME


def describe_failure(err: BaseException) -> str:
    """A runtime failure in words: the group's message (it names the rank and the call) with the rank's
    own error, an OS error with what it means for the run, else the error's type and message."""
    if isinstance(err, OSError) and err.errno in _OS_HINTS:
        return f"{err} ({_OS_HINTS[err.errno]})"
    text = str(err).strip() or "(no message)"
    if type(err).__name__ in ("LearnerGroupError", "RolloutFleetError", "LeaseLost") or text.startswith("stage 2 stopped"):
        return text
    return f"{type(err).__name__}: {text}"


_OS_HINTS = {errno.ENOSPC: "the disk is full: free space, or point run.output_dir at a larger volume; the last "
             "checkpoint is intact and the run resumes from it",
             errno.EDQUOT: "the disk quota is used up; the last checkpoint is intact and the run resumes from it",
             errno.EACCES: "the folder is not writable by this user: choose another run.output_dir",
             errno.EROFS: "the file system is read-only: choose another run.output_dir",
             errno.ENOTDIR: "a path component is a file, not a folder: choose another run.output_dir"}


def _save_traceback(args: argparse.Namespace, err: BaseException) -> str:
    """The traceback in ``<run.output_dir>/logs/<command>-<time>.traceback`` (or the temp folder when the
    run's folder is not writable); returns its path."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(err))
    name = f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.traceback"
    for folder in (Path(getattr(args, "output_dir", "") or ".") / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return str(folder / name)
        except OSError:
            continue
    return "(not written: no writable folder)"


def _run_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    args.output_dir = cfg.run.output_dir  # where a failure's traceback is kept
    if args.command == "config":
        from anyflow_ray.run.config_keys import describe

        sys.stdout.write(describe(cfg, " ".join([args.config, *args.overrides])))
        return 0
    if getattr(args, "dry_run", False):
        return _dry_run(cfg, args.command)
    from anyflow_ray.run import preflight

    preflight.check(cfg, args.command)  # inputs, before Ray starts or anything is asked of it
    module = importlib.import_module(f"anyflow_ray.jobs.{COMMANDS[args.command][0]}")
    extra = {"out": args.out} if args.command == "make-tiny" else {}
    if args.command == "export":
        extra = {"checkpoint": args.checkpoint, "out": args.out, "dtype": args.dtype, "lora": args.lora}
    if args.command == "sample":
        extra = {"image": args.image, "video": args.video}
    if args.command == "bench":
        actors = _positive_ints(args.actors)
        if not actors:
            print(f"anyflow-ray bench: --actors must be positive integers separated by commas (got {args.actors!r})",
                  file=sys.stderr)
            return 2
        extra = {"actors": actors,
                 "control_plane": "skip" if args.skip_control_plane else "only" if args.control_plane_only
                 else "data-only" if args.data_scale_only else "run"}
    if args.command == "bench-scale":
        try:
            steps = tuple(int(n) for n in args.steps.split(","))
        except ValueError:
            steps = ()
        if not steps or min(steps) < 1 or (args.layers is not None and args.layers < 1):
            print(f"anyflow-ray bench-scale: --steps must be positive integers separated by commas (got "
                  f"{args.steps!r}) and --layers >= 1 (got {args.layers})", file=sys.stderr)
            return 2
        extra = {"steps": steps, "num_layers": args.layers, "allow_cpu": args.allow_cpu}
    module.run(cfg, **extra)
    return 0


def _dry_run(cfg, command: str) -> int:
    """The memory plan of ``command`` (pretrain also prints its counts and DeepSpeed config first)."""
    from anyflow_ray.run.memory_plan import MemoryPlanError

    try:
        if command == "pretrain":
            importlib.import_module("anyflow_ray.jobs.pretrain").run(cfg, dry_run=True)
        else:
            importlib.import_module("anyflow_ray.jobs.dry_run").run(cfg, command)
    except MemoryPlanError as err:
        print(f"anyflow-ray {command}: {err}", file=sys.stderr)
        return EXIT_MEMORY_PLAN
    return 0


def _anticipated(err: BaseException | None) -> bool:
    """A config, input, checkpoint, shard or storage error: the user's to fix, told in one line. Classes of
    modules not imported yet cannot have been raised, so the CLI need not import them."""
    kinds = [ConfigError]  # also PreflightError, RunRefused, PlacementError
    for module, name in (("anyflow_ray.training.checkpoint", "CheckpointError"), ("anyflow_ray.data.shards", "ShardError"),
                         ("anyflow_ray.run.storage", "StorageError"), ("actors.fleet", "RolloutFleetError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return err is not None and isinstance(err, tuple(kinds))


def _one_line(err: BaseException | str) -> str:
    return "; ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _positive_ints(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> (1, 4, 16); () when any item is not a positive integer."""
    try:
        values = tuple(int(n) for n in text.split(","))
    except ValueError:
        return ()
    return values if values and min(values) >= 1 else ()


if __name__ == "__main__":
    sys.exit(main())
