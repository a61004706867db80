"""``LearnerGroup``: N Ray actors in one placement group, one DeepSpeed rank each.

Rank 0 picks the rendezvous address; every rank gets RANK, WORLD_SIZE, MASTER_ADDR/PORT and joins a
torch.distributed group (gloo on the CPU, nccl on GPUs) with a finite time-out. Calls fan out to all
ranks; a rank that fails to start, raises or dies fails the whole call at once with an error naming
the rank, never a hang. Each call goes where the method declares it runs (learners/ranks.py).

Each phase has its own limit (``learner.timeouts``, ``PHASE_OF``): placement, set-up, a step, a save
(its load on resume and the stage's export too); the collective watchdog of torch.distributed has its
own. During set-up (minutes at scale: the data index, 14B weights) every rank posts what it is doing
to a small ``SetupBoard`` actor and the group logs the board every ``report_every_s`` seconds, so a
long set-up is visibly alive and a stuck one names the rank and what it was doing.
"""

from __future__ import annotations

import logging
import re
import time

import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.placement import Placement, alive_nodes, check, plan
from learners.ranks import EVERY_RANK, runs_on
from learners.worker import LearnerWorker

log = logging.getLogger("anyflow_ray")
# learner method -> the phase whose limit (learner.timeouts.<phase>) bounds it; any other method: "step"
PHASE_OF = {"setup": "setup", "save": "save", "load_latest": "save", "export_pipeline": "save"}


class SetupBoard:
    """What each rank is doing during set-up, posted by the ranks and read by the group."""

    def __init__(self):
        self.posts: dict[int, tuple[float, str]] = {}

    def post(self, rank: int, text: str, at: float) -> None:
        self.posts[rank] = (at, text)

    def read(self) -> dict[int, tuple[float, str]]:
        return dict(self.posts)


class LearnerGroupError(RuntimeError):
    """A rank failed, died or timed out; ``cause`` is the rank's own exception when it raised one."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def death_notice(err: Exception) -> str:
    """Ray's dozens of lines about a dead actor as its pid, node and exit detail."""
    text = " ".join(str(err).split())
    pid, ip = re.search(r"\bpid: (\d+)", text), re.search(r"\bip: (\S+?);?\s", text)
    detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes|$)", text)
    where = f"pid {pid.group(1)} on {ip.group(1)}" if pid and ip else "its process"
    return f"{where}: {detail.group(1).rstrip('. ') if detail else text[:200]}; killed, out of memory or crashed"


class LearnerGroup:
    error = LearnerGroupError  # what code handed a group raises for a learner failure (actors/ imports no learners/)
    report_every_s = 30.0  # set-up: the board logged this often

    def __init__(self, cfg: DictConfig, job: str, num_ranks: int | None = None, worker_cls: type = LearnerWorker,
                 placement: Placement | None = None):
        self.cfg, self.job, self.worker_cls = cfg, job, worker_cls
        self.num_ranks = int(num_ranks or cfg.learner.num_ranks)
        self.limits = {phase: float(limit) for phase, limit in cfg.learner.timeouts.items()}
        self.board = None
        self.plan = placement or plan(cfg, self.num_ranks)
        check(self.plan, alive_nodes(), bool(cfg.run.autoscaling))
        self.placement = placement_group([self.plan.bundle] * self.num_ranks, strategy="PACK")
        try:
            self._wait(self.placement.ready(), "placement", f"placement group ({self.plan.describe()}; the cluster has "
                       f"{ray.available_resources()} free now)")
        except LearnerGroupError:
            self.shutdown()
            raise
        threads = max(1, int(cfg.run.threads) // self.num_ranks)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        if cfg.learner.see_node_gpus:  # Ray leaves CUDA_VISIBLE_DEVICES alone; each rank selects its GPU itself
            env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
        self.board = ray.remote(SetupBoard).options(num_cpus=0).remote()  # starts while the ranks do
        remote_cls = ray.remote(worker_cls)
        plain_cfg = OmegaConf.to_container(cfg, resolve=True)
        self.workers = [
            remote_cls.options(num_cpus=self.plan.rank_cpus, num_gpus=self.plan.rank_gpus, max_restarts=0,
                               runtime_env={"env_vars": env}, name=None,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   self.placement, placement_group_bundle_index=rank)).remote(
                plain_cfg, job, rank, self.num_ranks)
            for rank in range(self.num_ranks)
        ]
        try:
            addr, port = self._wait(self.submit("rendezvous_address")[0], "setup", "rank 0 rendezvous address")
            self.info = self.call("setup", addr, port, self.board)
            if self.info[0].get("allreduce_busbw_gbs") is not None:  # ranks that timed one (not stand-ins)
                log.info("%s learner group: all-reduce bus bandwidth %.2f GB/s over %d ranks (%s)", job,
                         self.info[0]["allreduce_busbw_gbs"], self.num_ranks, self.info[0]["backend"])
        except BaseException:
            self.shutdown()
            raise

    # -- calls ----------------------------------------------------------------------------------
    def call(self, method: str, *args, **kwargs):
        """Call ``method`` where it declares it runs (learners/ranks.py): every rank's results in rank
        order, or rank 0's result."""
        results = self.gather(self.submit(method, *args, **kwargs), method)
        return results if runs_on(self.worker_cls, method) == EVERY_RANK else results[0]

    def submit(self, method: str, *args, **kwargs) -> list:
        """Start ``method`` where it declares it runs and return its refs at once (the driver works while
        the ranks do); ``gather`` them. Calls to a rank run in the order they were submitted."""
        workers = self.workers if runs_on(self.worker_cls, method) == EVERY_RANK else self.workers[:1]
        return [getattr(worker, method).remote(*args, **kwargs) for worker in workers]

    def gather(self, refs: list, what: str) -> list:
        """Results of ``submit`` in rank order; the first failure (error or dead actor) raises
        LearnerGroupError at once, naming its rank; a rank still running after its phase's limit
        (``learner.timeouts.<PHASE_OF[what]>``) too."""
        phase = PHASE_OF.get(what, "step")
        limit = self.limits[phase]
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, started = list(refs), time.monotonic()
        deadline, report = started + limit, started + self.report_every_s
        while pending:
            now = time.monotonic()
            if now >= deadline:
                late = sorted(rank_of[r] for r in pending)
                raise LearnerGroupError(f"learner call {what!r} timed out after {limit:.0f}s (learner.timeouts."
                                        f"{phase}; ranks still running: {late}){self._last_posts(late, phase)}")
            if phase == "setup" and now >= report:
                log.info("%s set-up, %.0fs%s", self.job, now - started, self._last_posts(range(self.num_ranks), phase))
                report = now + self.report_every_s
            wake = min(deadline, report) if phase == "setup" else deadline
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, wake - time.monotonic()))
            for ref in done:
                try:
                    ray.get(ref)
                except RayActorError as err:
                    raise LearnerGroupError(f"learner rank {rank_of[ref]} died during {what!r} ({death_notice(err)}); "
                                            f"the same command resumes from the last checkpoint") from err
                except RayTaskError as err:
                    cause = err.cause
                    raise LearnerGroupError(f"learner rank {rank_of[ref]} failed in {what!r}: "
                                            f"{type(cause).__name__}: {cause}", cause=cause) from err
        return ray.get(refs)

    def _last_posts(self, ranks, phase: str) -> str:
        """``; rank r: <what it posted> (<age>s ago)`` for each of ``ranks`` (set-up only)."""
        if phase != "setup" or self.board is None:
            return ""
        try:
            posts = ray.get(self.board.read.remote(), timeout=2)
        except Exception:  # the board is a convenience: never the reason a call fails
            return ""
        now = time.time()
        return "".join(f"; rank {r}: {posts[r][1]} ({now - posts[r][0]:.0f}s ago)" if r in posts else
                       f"; rank {r}: nothing posted yet" for r in ranks)

    def _wait(self, ref, phase: str, what: str):
        limit = self.limits[phase]
        try:
            return ray.get(ref, timeout=limit)
        except GetTimeoutError as err:
            raise LearnerGroupError(f"timed out after {limit:.0f}s (learner.timeouts.{phase}) waiting for {what}") from err
        except RayActorError as err:
            raise LearnerGroupError(f"learner failed to start ({what}): {err}") from err

    def bundle_strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling into rank ``index``'s bundle (for rollout actors colocated with that rank)."""
        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index)

    def shutdown(self) -> None:
        for worker in getattr(self, "workers", []):
            ray.kill(worker, no_restart=True)
        self.workers = []
        if getattr(self, "board", None) is not None:
            ray.kill(self.board, no_restart=True)
            self.board = None
        if getattr(self, "placement", None) is not None:
            remove_placement_group(self.placement)
            self.placement = None
