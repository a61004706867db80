"""Where learner ranks and rollout actors go: resources from the config and the cluster, never the driver.

A submitted job's driver runs on the head node, which usually has no GPU, so nothing here looks at
the driver's own hardware: ``auto`` GPU counts are read from ``ray.cluster_resources()``. Learner
ranks get one placement-group bundle each; with ``rollout.colocate`` every bundle also holds the
share of the rollout actors placed beside that rank (actor i with rank i mod num_ranks), e.g. 0.5 +
0.5 of one GPU. A plan that the cluster's nodes cannot hold fails at once, naming what it asked for
and what the nodes have (unless ``run.autoscaling`` says nodes will join on demand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from omegaconf import DictConfig

from anyflow_ray.run.config import ConfigError, gpu_amount


class PlacementError(ConfigError):
    """The config asks for more than the cluster's nodes can hold (the CLI prints it in one line)."""


@dataclass(frozen=True)
class Placement:
    num_ranks: int
    rank_cpus: float
    rank_gpus: float
    num_actors: int = 0
    actor_cpus: float = 0.0
    actor_gpus: float = 0.0
    colocate: bool = False

    @property
    def actors_per_bundle(self) -> int:
        return math.ceil(self.num_actors / self.num_ranks) if self.colocate else 0

    @property
    def bundle(self) -> dict[str, float]:
        """One learner rank's bundle, with room for the actors colocated with it."""
        cpus = self.rank_cpus + self.actors_per_bundle * self.actor_cpus
        gpus = self.rank_gpus + self.actors_per_bundle * self.actor_gpus
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    def actor_resources(self) -> dict[str, float]:
        return {"CPU": self.actor_cpus, **({"GPU": self.actor_gpus} if self.actor_gpus else {})}

    def demands(self) -> list[dict[str, float]]:
        """Everything the job asks for: the bundles, then the actors that stand outside them."""
        loose = [] if self.colocate else [self.actor_resources()] * self.num_actors
        return [self.bundle] * self.num_ranks + loose

    def describe(self) -> str:
        text = f"{self.num_ranks} learner bundle(s) of {self.bundle}"
        if self.num_actors:
            where = "inside the learner bundles" if self.colocate else "outside them"
            text += f" and {self.num_actors} rollout actor(s) of {self.actor_resources()} {where}"
        return text


def plan(cfg: DictConfig, num_ranks: int, num_actors: int = 0) -> Placement:
    """The job's resources: GPU counts from the config, ``auto`` resolved against the cluster."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    colocate = bool(cfg.rollout.colocate) and num_actors > 0
    return Placement(num_ranks=num_ranks, rank_cpus=float(cfg.learner.cpus_per_rank),
                     rank_gpus=gpu_amount(cfg.learner.gpus_per_rank, cluster_gpus, colocate),
                     num_actors=num_actors, actor_cpus=float(cfg.rollout.cpus_per_actor),
                     actor_gpus=gpu_amount(cfg.rollout.gpus_per_actor, cluster_gpus, colocate) if num_actors else 0.0,
                     colocate=colocate)


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total CPU/GPU (what could ever be placed there)."""
    return [{k: float(v) for k, v in node["Resources"].items() if k in ("CPU", "GPU")}
            for node in ray.nodes() if node.get("Alive")]


def fits(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First-fit decreasing: can every demand be put on one node without exceeding any node's totals?"""
    free = [dict(node) for node in nodes]
    for demand in sorted(demands, key=lambda d: (d.get("GPU", 0.0), d.get("CPU", 0.0)), reverse=True):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in demand.items()):
                for k, v in demand.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def check(placement: Placement, nodes: list[dict[str, float]], autoscaling: bool) -> None:
    """Refuse a plan the nodes cannot hold, naming the keys that set it and what the nodes have."""
    if autoscaling or fits(placement.demands(), nodes):
        return
    keys = "learner.num_ranks / learner.cpus_per_rank / learner.gpus_per_rank"
    if placement.num_actors:
        keys += " / rollout.num_actors / rollout.cpus_per_actor / rollout.gpus_per_actor / rollout.colocate"
    raise PlacementError(f"the cluster cannot hold {placement.describe()}; its nodes have {nodes or 'nothing'}. "
                         f"Change {keys}, add nodes, or set run.autoscaling=true if nodes join on demand")
