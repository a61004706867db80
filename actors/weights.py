"""Versioned weight broadcast through the object store.

Learner rank 0 ``ray.put``s the *trainable* parameters (the LoRA adapters when LoRA is on) and the
driver publishes the ref here with a version; rollout actors fetch the newest version between
rollouts and report what they loaded. Only the latest two versions are kept referenced.
"""

from __future__ import annotations


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
