"""Where a learner method runs, declared where it is defined: ``@every_rank`` (a collective, or work
each rank does on its own part: steps, saves, loads, ZeRO-3 gathers) or ``@rank_zero`` (work that needs
no other rank: metadata, the weight-broadcast root). ``LearnerGroup.call`` / ``submit`` read the
declaration, so no call site chooses. An override keeps its base's declaration; a method without one
is refused by the group."""

from __future__ import annotations

EVERY_RANK, RANK_ZERO = "every rank", "rank 0"


def every_rank(method):
    method.runs_on = EVERY_RANK
    return method


def rank_zero(method):
    method.runs_on = RANK_ZERO
    return method


def runs_on(worker_cls: type, method: str) -> str:
    """``EVERY_RANK`` or ``RANK_ZERO``: the declaration of ``method`` nearest in ``worker_cls``'s MRO."""
    for klass in worker_cls.__mro__:
        fn = klass.__dict__.get(method)
        if fn is not None and hasattr(fn, "runs_on"):
            return fn.runs_on
    if not callable(getattr(worker_cls, method, None)):
        raise AttributeError(f"{worker_cls.__name__} has no method {method!r}")
    raise TypeError(f"{worker_cls.__name__}.{method} does not declare where it runs: decorate it with "
                    f"@every_rank or @rank_zero (learners/ranks.py)")
