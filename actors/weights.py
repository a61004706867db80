"""Weight versions from the learners to the rollout actors (``distill.weight_sync``), the driver's side.

``WeightRegistry`` (a Ray actor) keeps the newest versions and what each actor loaded. The two
transports behind ``anyflow_ray.run.weight_sync.WeightSync``, built by ``make_weight_sync`` from the
config and handed the job's learner group:

``object_store`` (default): learner rank 0 ``ray.put``s the trainable parameters (every rank is called:
under ZeRO-3 they gather the partitions together), the registry keeps the ref, and each actor pulls
the newest version between rollouts. Asynchronous; a restarted actor
pulls the newest version in its constructor.

``torch_dist``: learner rank 0 broadcasts the trainable parameters, packed per dtype, over a process
group of its own with every rollout actor (gloo on the CPU, nccl on GPUs; ``anyflow_ray/run/weight_sync.py``).
Synchronous for the driver; each actor serves the weight calls in a concurrency group of their own,
so a broadcast lands between two trajectories even while a rollout waits for buffer space. Membership
is fixed per epoch, so when an actor is restarted (or dies mid-broadcast) the driver forms a new epoch
and sends the current version again; until then the restarted actor makes no trajectories. The
registry still records each version, so the driver's check of the versions actors loaded is the same
for both backends.

The learner side (learners/publish.py) and the actor side (actors/rollout.py) share the
torch.distributed transport of anyflow_ray/run/weight_sync.py; neither imports the other.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from anyflow_ray.run.config import ConfigError
from anyflow_ray.run.weight_sync import WeightSync

log = logging.getLogger("anyflow_ray")


class WeightRegistry:
    """Run as ``ray.remote(WeightRegistry)``."""

    def __init__(self):
        self.versions: dict[int, list] = {}
        self.loaded: dict[str, int] = {}
        self.starts: list[tuple[str, int]] = []  # (actor, version loaded at start): restarts show up here

    def publish(self, version: int, wrapped_ref: list) -> None:
        if self.versions and version <= max(self.versions):
            raise ValueError(f"weight version {version} is not newer than {max(self.versions)}")
        self.versions[version] = wrapped_ref
        for old in sorted(self.versions)[:-2]:
            del self.versions[old]

    def latest(self) -> tuple[int, list | None]:
        if not self.versions:
            return -1, None
        version = max(self.versions)
        return version, self.versions[version]

    def report_loaded(self, actor_id: str, version: int) -> None:
        self.loaded[actor_id] = version

    def report_started(self, actor_id: str, version: int) -> None:
        self.starts.append((actor_id, version))

    def start_log(self) -> list[tuple[str, int]]:
        return list(self.starts)

    def loaded_versions(self) -> dict[str, int]:
        return dict(self.loaded)


class ObjectStoreSync(WeightSync):
    """Publishing is queued, not awaited: each rank's ``publish_weights`` runs before its next
    ``train_step`` (calls to an actor keep their order; under ZeRO-3 all ranks gather together, at
    ZeRO <= 2 the others return at once), and the registry takes rank 0's ref when it is made. So
    the driver can publish version v and start step v+1 at once (``overlaps_learner``); a failed
    publish, on any rank, surfaces at the next ``heal`` or ``finish``."""

    name = "object_store"
    overlaps_learner = True

    def __init__(self, cfg, group, registry, actor_gpus: float = 0.0):
        self.group, self.registry = group, registry
        self.timeout = float(cfg.learner.timeouts.step)
        self.in_flight: list[tuple[int, object, list, float]] = []  # (version, registry ref, rank refs, submitted at)
        self.times: list[float] = []  # submit -> in the registry, per version

    def start(self, version: int, make_fleet):
        """Publish the first version before the actors exist: each pulls it in its constructor."""
        self.publish(version, None)
        self.finish()
        return make_fleet()

    def publish(self, version: int, fleet) -> float:
        start = time.perf_counter()
        refs = self.group.submit("publish_weights")  # rank 0's result is the ref; the others return None
        self.in_flight.append((version, self.registry.publish.remote(version, refs[0]), refs, start))
        return time.perf_counter() - start

    def heal(self, version: int, fleet) -> None:
        """Confirm the publishes that landed (a restarted actor pulls the newest version itself)."""
        self._confirm(wait=False)

    def finish(self) -> None:
        """Every queued publish in the registry (bounded by ``learner.timeouts.step``)."""
        self._confirm(wait=True)

    def _confirm(self, wait: bool) -> None:
        error = self.group.error
        while self.in_flight:
            version, ref, rank_refs, start = self.in_flight[0]
            everything = [ref, *rank_refs[1:]]
            done, _ = ray.wait(everything, num_returns=len(everything), timeout=self.timeout if wait else 0)
            if len(done) < len(everything):
                if wait:
                    raise error(f"publishing weight version {version} did not finish within "
                                            f"{self.timeout:.0f}s (learner.timeouts.step)")
                return
            for rank, part in [(0, ref), *list(enumerate(rank_refs))[1:]]:
                try:
                    ray.get(part)
                except (RayActorError, RayTaskError) as err:
                    if isinstance(err, RayActorError) or isinstance(getattr(err, "cause", None), RayActorError):
                        raise error(f"learner rank {rank} died before weight version {version} was "
                                                f"published: {err}") from err
                    raise error(f"publishing weight version {version} failed on learner rank "
                                            f"{rank}: {err!r}", cause=getattr(err, "cause", None)) from err
            self.times.append(time.perf_counter() - start)
            self.in_flight.pop(0)


class CollectiveSync(WeightSync):
    name = "torch_dist"
    overlaps_learner = False  # a broadcast holds rank 0 and every actor: the driver waits for it

    def __init__(self, cfg, group, registry, actor_gpus: float = 0.0, attempts: int = 3):
        self.group, self.registry = group, registry
        self.backend, self.timeout = _group_backend(cfg, group, actor_gpus), float(cfg.distill.sync_timeout_s)
        self.attempts = attempts
        self.layout = group.call("weight_layout")
        self.epoch = -1
        self.failures_seen = -1  # fleet.failed_tasks when the current epoch formed
        self.published = -1
        self.times: list[float] = []  # per broadcast

    @property
    def reforms(self) -> int:
        """Groups formed after the first one (each epoch is one formation)."""
        return max(self.epoch, 0)

    def start(self, version: int, make_fleet):
        """The actors must exist before the first broadcast; until it lands they make nothing."""
        fleet = make_fleet()
        self.publish(version, fleet)
        return fleet

    def publish(self, version: int, fleet) -> float:
        """Broadcast ``version`` to every actor, re-forming the group first if its members changed."""
        start = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            try:
                if not self._members_current(fleet) or fleet.failed_tasks != self.failures_seen:
                    self._form(fleet)
                root = self.group.submit("broadcast_weights")[0]
                receivers = [actor.receive_weights.remote(version) for actor in fleet.actors]
                self._wait(root, receivers, f"broadcast of weight version {version}")
                break
            except (RayActorError, RayTaskError, GetTimeoutError) as err:  # an actor died / lost its peer
                if isinstance(err, RayTaskError) and isinstance(err.cause, (ValueError, KeyError)):
                    raise  # a layout or backend the members cannot take: retrying will not help
                if attempt == self.attempts:
                    raise RuntimeError(f"weight broadcast of version {version} failed {attempt} times; "
                                       f"last error: {err}") from err
                log.warning("weight broadcast of version %d failed (%s); re-forming the group", version,
                            type(err).__name__)
                self.failures_seen = -1
        if version > self.published:
            ray.get(self.registry.publish.remote(version, None))
            self.published = version
        self.times.append(time.perf_counter() - start)
        return self.times[-1]

    def finish(self) -> None:
        """Nothing queued: ``publish`` returns when every actor holds the version."""

    def heal(self, version: int, fleet) -> None:
        """An actor was restarted since the group formed: bring it in and send it the current version.

        Noticed from a rollout lost with its actor, or from a rollout a fresh process skipped (an actor
        that died while idle loses no rollout). Re-sending to members already current is harmless.
        """
        if self.epoch < 0 or (fleet.failed_tasks == self.failures_seen and not fleet.saw_skipped):
            return
        log.info("a rollout actor restarted; re-forming the weight group if needed and re-sending version %d",
                 version)
        fleet.saw_skipped = False
        self.publish(version, fleet)

    # -- internals ----------------------------------------------------------------------------
    def _members_current(self, fleet) -> bool:
        """Whether every actor process is in the current epoch; waits (bounded) for restarting actors."""
        deadline = time.monotonic() + 2 * self.timeout
        while True:
            try:
                epochs = ray.get([actor.weight_group_epoch.remote() for actor in fleet.actors],
                                 timeout=max(1.0, deadline - time.monotonic()))
                return all(epoch == self.epoch for epoch in epochs)
            except ActorUnavailableError:  # being restarted by Ray: ask again shortly
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _form(self, fleet) -> None:
        self.epoch += 1
        actors = fleet.actors
        failures = fleet.failed_tasks
        ray.get([actor.accept_weight_layout.remote(self.layout) for actor in actors], timeout=2 * self.timeout)
        size = len(actors) + 1
        host, port = self.group.call("weight_group_address", size)
        root = self.group.submit("open_weight_group", host, port, size, self.epoch, self.backend)[0]
        members = [actor.join_weight_group.remote(host, port, rank, size, self.epoch, self.backend)
                   for rank, actor in enumerate(actors, start=1)]
        self._wait(root, members, f"forming weight group epoch {self.epoch}")
        self.failures_seen = failures

    def _wait(self, root, members: list, what: str):
        """All refs, in a bounded time; a dead or failing learner rank 0 is a learner error."""
        error = self.group.error
        refs = [root, *members]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=2 * self.timeout)
        if pending:
            raise error(f"{what}: {len(pending)} of {len(refs)} members gave no answer within "
                                    f"{2 * self.timeout:.0f}s (distill.sync_timeout_s={self.timeout:g})")
        member_errors = []
        for ref in members:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                member_errors.append(err)
        try:
            ray.get(root)
        except RayActorError as err:
            raise error(f"learner rank 0 died during the {what}: {err}") from err
        except RayTaskError as err:
            if not member_errors:  # the root failed on its own: not a membership problem
                raise error(f"learner rank 0 failed in the {what}: {err.cause!r}") from err
            raise member_errors[0] from err
        if member_errors:
            raise member_errors[0]


def _group_backend(cfg, group, actor_gpus: float) -> str:
    """One backend for every member: nccl only when learner rank 0 and every actor own a whole GPU."""
    learner_on_gpu = group.info[0]["device"].startswith("cuda")  # where rank 0 runs, not the driver
    actors_on_gpu = actor_gpus >= 1  # NCCL refuses two ranks on one GPU (colocated actors share rank 0's)
    if cfg.distill.sync_backend == "nccl" and not (learner_on_gpu and actors_on_gpu):
        raise ConfigError(f"distill.sync_backend=nccl needs learner rank 0 on a GPU (it is on "
                          f"{group.info[0]['device']}) and rollout.gpus_per_actor >= 1 (it is "
                          f"{cfg.rollout.gpus_per_actor}, resolved to {actor_gpus:g}); use gloo or auto")
    if cfg.distill.sync_backend != "auto":
        return cfg.distill.sync_backend
    return "nccl" if learner_on_gpu and actors_on_gpu else "gloo"


def make_weight_sync(cfg, group, registry, placement=None):
    actor_gpus = placement.actor_gpus if placement is not None else 0.0
    kind = CollectiveSync if cfg.distill.weight_sync == "torch_dist" else ObjectStoreSync
    return kind(cfg, group, registry, actor_gpus)
