"""One writer per run folder: a lease file the training job's driver holds while it runs.

``<output>/.lease.json`` names its owner (user, host, pid, the Ray job's submission id when there is
one, the job) and a heartbeat the driver's background thread renews every ``run.lease_expiry_s / 10``
seconds, from before Ray starts to after the export, so a long set-up (placement, loading a 14B model)
heartbeats too. A second run on the folder is refused in one line naming the owner. A lease lets go:

- at once when its owner is a process of this host that no longer exists (a killed driver);
- ``run.lease_expiry_s`` after its last heartbeat otherwise (a dead node's driver), with a warning.

Creation is atomic (a hard link of a complete file, or ``O_EXCL`` where links are refused), and a taker
moves a stale lease aside with a rename, which one taker wins. A driver whose lease was taken over (it
stalled longer than the expiry) stops at its next step (``check``) rather than write on beside the new
owner. This holds on local disks and on the POSIX mounts clusters share (NFS v4, EFS, Lustre, a PVC);
expiry compares heartbeats written by other hosts with this host's clock, so keep the expiry far above
the clock skew (minutes, the default 300 s).

With ``run.storage`` (object storage: no rename-if-absent through pyarrow) the lease is also written to
storage and read from it before a run starts, so a second cluster's run on the same storage folder is
refused while the first heartbeats; two submitted within one heartbeat of each other can both start.
What holds a folder to one writer there is a single submitter: a KubeRay RayJob (one driver per job,
resubmitted only after the previous one ended) or a scheduler that runs one job per folder.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from anyflow_ray.run.config import ConfigError
from anyflow_ray.run.storage import Storage

LEASE = ".lease.json"


class LeaseHeld(ConfigError):
    """The folder is another live run's; the message names it."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (this one stalled past ``run.lease_expiry_s``)."""


class Lease:
    def __init__(self, out: Path, job: str, expiry_s: float, storage: Storage | None = None):
        self.path, self.job, self.expiry_s = Path(out) / LEASE, job, float(expiry_s)
        self.storage = storage if storage is not None and storage.enabled else None
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record -------------------------------------------------------------------------------
    def record(self) -> dict:
        return {"token": self.token, "job": self.job, "user": _user(), "host": socket.gethostname(),
                "pid": os.getpid(), "ray_job": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                "heartbeat": time.time(), "expiry_s": self.expiry_s}

    def _write_new(self) -> bool:
        """Create the lease file if there is none: a complete file linked into place (atomic)."""
        tmp = self.path.with_name(f"{LEASE}.{self.token}.tmp")
        tmp.write_text(json.dumps(self.record()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create (a reader may see it empty)
            try:
                with open(self.path, "x") as f:
                    f.write(tmp.read_text())
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    # -- acquiring ----------------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_stored()
        for _ in range(20):
            if self._write_new():
                self._upload()
                self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
                self._thread.start()
                return self
            held = read(self.path)
            if held is None:  # mid-creation (O_EXCL fallback) or just released: look again
                time.sleep(0.05)
                continue
            reason = stale_reason(held)
            if reason is None:
                raise LeaseHeld(describe(held, self.path.parent))
            aside = self.path.with_name(f"{LEASE}.stale-{self.token}")
            try:
                os.rename(self.path, aside)  # one taker wins; the others find the winner's lease
            except FileNotFoundError:
                continue
            taken = read(aside)
            if taken is not None and taken.get("token") != held.get("token"):  # a live lease moved by mistake
                try:
                    os.link(aside, self.path)
                finally:
                    aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            print(f"{self.job}: taking over the run folder {self.path.parent}: the lease of the {owner(held)} "
                  f"{reason}", flush=True)
        raise LeaseHeld(f"could not take the lease of {self.path.parent} (other runs keep taking it)")

    def _check_stored(self) -> None:
        if self.storage is None:
            return
        text = self.storage.read_text(self.path)
        held = json.loads(text) if text else None
        if held and stale_reason(held, local_host_check=False) is None:
            raise LeaseHeld(describe(held, self.path.parent) + f" (its lease in {self.storage.uri})")

    def _upload(self) -> None:
        if self.storage is not None:
            self.storage.upload(self.path)

    # -- holding -------------------------------------------------------------------------------------
    def _beat(self) -> None:
        interval = max(0.2, self.expiry_s / 10)
        while not self._stop.wait(interval) and self.beat():
            pass

    def beat(self) -> bool:
        """Renew the heartbeat; False (and ``lost`` set) when the lease is no longer this run's."""
        held = read(self.path)
        if held is None or held.get("token") != self.token:
            self.lost = (f"the lease of {self.path.parent} was taken over by the "
                         f"{owner(held) if held else 'nobody (its file was removed)'}")
            return False
        tmp = self.path.with_name(f"{LEASE}.{self.token}.tmp")
        tmp.write_text(json.dumps({**held, "heartbeat": time.time()}))
        os.replace(tmp, self.path)
        try:
            self._upload()
        except OSError:  # storage briefly unreachable: the next beat tries again
            pass
        return True

    def check(self) -> None:
        """Raise ``LeaseLost`` when another run took the folder over: called by the step loops."""
        if self.lost:
            raise LeaseLost(f"{self.job}: stopped: {self.lost} after this run's heartbeat stalled past "
                            f"run.lease_expiry_s={self.expiry_s:g}; that run now writes the folder")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = read(self.path)
        if held is not None and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)
            if self.storage is not None:
                self.storage.delete_file(self.path)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read(path: Path) -> dict | None:
    try:
        held = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def stale_reason(held: dict, local_host_check: bool = True) -> str | None:
    """Why a lease no longer holds (None: it does): its owner is a dead process of this host, or its
    heartbeat is older than its expiry."""
    if local_host_check and held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
        return "is gone: its process on this host no longer exists"
    age = time.time() - float(held.get("heartbeat", 0))
    if age > float(held.get("expiry_s", 0)):
        return f"expired: its last heartbeat was {age:.0f} s ago (run.lease_expiry_s={float(held.get('expiry_s', 0)):g})"
    return None


def owner(held: dict) -> str:
    job = f", Ray job {held['ray_job']}" if held.get("ray_job") else ""
    return f"{held.get('job', '?')} run of {held.get('user', '?')}@{held.get('host', '?')} (pid {held.get('pid', '?')}{job})"


def describe(held: dict, out: Path) -> str:
    age = time.time() - float(held.get("heartbeat", 0))
    return (f"{out} is being written by the {owner(held)}, last heartbeat {age:.0f} s ago: two runs on one "
            f"folder would interleave their records. Wait for it or stop it, or set run.new_run=true to write "
            f"a fresh folder; a crashed owner's lease lets go {float(held.get('expiry_s', 0)):g} s after its last "
            f"heartbeat (run.lease_expiry_s), at once when it was a process of this host")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process (or no pid recorded): assume it lives
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
