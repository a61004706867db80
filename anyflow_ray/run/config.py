"""One config tree: OmegaConf structured configs (the dataclasses of ``schema.py``), YAML files, ``key=value`` overrides.

``load_config("configs/tiny.yaml", ["train.steps=200"])`` merges YAML and overrides onto the dataclass schema;
a YAML file may start from another with ``extends: other.yaml`` (its own keys win). An unknown key or a value
of the wrong type fails with OmegaConf's message (which names the key); ``config_checks.validate`` then checks
ranges and names the offending key too. Nothing runs before the config is valid. What each key means:
``config_keys.KEYS`` (``anyflow-ray config`` prints them); a default that follows another key is an
interpolation (``"${learner.zero_stage}"``, ``INHERITED``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from anyflow_ray.run.schema import (  # noqa: F401  (the schema, re-exported)
    TinyModelConfig, LoraConfig, CausalConfig, ModelConfig, ScheduleConfig, DataConfig, PrepareConfig,
    TeacherConfig, TimeoutsConfig, LearnerConfig, PretrainConfig, RolloutConfig, DistillConfig,
    ExperimentsConfig, SampleConfig, EvalConfig, RunConfig, Config,
)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


# key -> (the key its default follows: an interpolation in the schema, the value that meant "follow it"
# before it was one). A config.yaml of an earlier run still holds that value (records.py reads it so).
INHERITED: dict[str, tuple[str, Any]] = {
    "distill.critic_lr": ("distill.lr", 0.0),
    "experiments.dmd_shift": ("schedule.shift", 0.0),
    "distill.num_ranks": ("learner.num_ranks", 0),
    "distill.zero_stage": ("learner.zero_stage", -1),
}

# key of an earlier version -> where it lives now (an override or a YAML file naming the old place is told
# so; records.py reads an earlier run's config.yaml through it). grad_scope=jump: experiments.grad_jump_only
MOVED: dict[str, str] = {f"distill.{leaf}": f"experiments.{leaf}"
                         for leaf in ("critic_updates", "dmd_shift", "critic_times", "rollout_weights")}
# key of an earlier version -> the keys that replaced it (told so; an earlier run's value is not carried over)
SPLIT: dict[str, str] = {"learner.timeout_s": "one limit per phase: learner.timeouts.placement, .setup, .step, "
                                              ".save and .collective (seconds)"}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- ``key=value`` overrides, then resolved and validated."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(Path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0]
            _refuse_moved(key, item.split("=", 1)[1], f"override {item!r}")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except (OmegaConfBaseException, yaml.YAMLError) as err:  # YAML: e.g. an unquoted ${...} in a list
                raise ConfigError(f"bad override {key!r}: {err}") from err
        inherits = {key: source for key, (source, _) in INHERITED.items() if _follows(merged, key, source)}
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config{f' {path}' if path else ''}: {err}") from err
    from anyflow_ray.run.config_checks import validate  # it imports this module

    validate(merged, inherits)
    if merged.rollout.num_actors == "auto":  # the planned count, recorded as a number (run/fleet_plan.py)
        from anyflow_ray.run.fleet_plan import fleet_plan

        merged.rollout.num_actors = fleet_plan(merged).num_actors
    OmegaConf.set_readonly(merged, True)
    return merged


def _load_yaml(path: Path, extended_by: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML config merged onto the file its top-level ``extends:`` names (relative to its folder)."""
    where = f" (extended by {extended_by[-1]})" if extended_by else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in {p.resolve() for p in extended_by}:
        chain = " -> ".join(str(p) for p in (*extended_by, path))
        raise ConfigError(f"config 'extends' cycle: {chain}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{line}: malformed YAML ({problem}){where}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got a {type(node).__name__}")
    for key in (*MOVED, *SPLIT, "distill.grad_scope"):
        if OmegaConf.select(node, key, default=None) is not None:
            _refuse_moved(key, str(OmegaConf.select(node, key)), f"config file {path}")
    parent = node.pop("extends", None)
    if parent is None:
        return node
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"extends={parent!r} in {path}: must be the path of another YAML config")
    return OmegaConf.merge(_load_yaml(path.parent / parent, (*extended_by, path)), node)


def _refuse_moved(key: str, value: str, where: str) -> None:
    """A key (or value) an earlier version had, told where it lives now."""
    if key in SPLIT:
        raise ConfigError(f"{where}: {key} is now {SPLIT[key]}")
    if key in MOVED:
        raise ConfigError(f"{where}: {key} is now {MOVED[key]} (a study knob: the experiments group)")
    if key == "distill.grad_scope" and value == "jump":
        raise ConfigError(f"{where}: grad_scope=jump is now experiments.grad_jump_only=true (a study knob)")


def grad_scope(cfg: DictConfig) -> str:
    """The jumps DMD's gradient flows through: ``distill.grad_scope`` (last | all), or ``jump`` when the
    study knob ``experiments.grad_jump_only`` is on."""
    return "jump" if cfg.experiments.grad_jump_only else str(cfg.distill.grad_scope)


def _follows(cfg: DictConfig, key: str, source: str) -> bool:
    """Whether ``key`` still holds the interpolation ``${source}`` (its default: the user left it unset)."""
    group, _, leaf = key.rpartition(".")
    return OmegaConf.to_container(OmegaConf.select(cfg, group), resolve=False).get(leaf) == "${%s}" % source


def latent_frames(cfg: DictConfig) -> int:
    """Latent frames of a clip: its frames in pixel space, 1 + (frames - 1) / 4 through the Wan VAE."""
    return int(cfg.data.frames) if cfg.model.pixel_space else (int(cfg.data.frames) - 1) // 4 + 1


def gpu_amount(value: str, cluster_gpus: float, colocate: bool) -> float:
    """A ``gpus_per_rank`` / ``gpus_per_actor`` value as a number: ``auto`` is 1 GPU (0.5 when a learner
    rank and a rollout actor share one) when the cluster has any, else 0."""
    if value != "auto":
        return float(value)
    if cluster_gpus <= 0:
        return 0.0
    return 0.5 if colocate else 1.0


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def relocate_run(tree: dict, section: str, actual_out: str | Path) -> dict:
    """A run's resolved config (``tree``, e.g. a checkpoint's) with the folders under its ``run.output_dir``
    moved to where the run folder is now: ``actual_out`` is where ``<section>.output`` lies today (a copied
    or moved run). Unchanged when nothing moved or the folder is not laid out under ``run.output_dir``."""
    old_out = os.path.abspath(str(tree.get(section, {}).get("output", "")))
    old_root = os.path.abspath(str(tree.get("run", {}).get("output_dir", "")))
    new_out = os.path.abspath(str(actual_out))
    if old_out == new_out or not old_out.startswith(old_root + os.sep):
        return tree
    rel = os.path.relpath(old_out, old_root)
    if not new_out.endswith(os.sep + rel):
        return tree
    new_root = new_out[: -len(rel) - 1]

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old_root or value.startswith(old_root + os.sep)):
            return new_root + value[len(old_root):]
        return value

    return move(tree)
