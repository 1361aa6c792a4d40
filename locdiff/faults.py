"""Fault injection for the crash-safety tests: named points where a process can be made to die.

``LOCDIFF_FAULT="POINT[@rankR][@N][=ACTION]"`` (comma-separated for several): the N-th time (default 1st)
this process reaches ``POINT``, it is SIGKILLed (ACTION ``kill``, the default) or sleeps (``sleep:S``).
``@rankR`` limits it to the process whose torchrun ``$RANK`` is R (a process without one is rank 0).
Points are ``<stage>:<event>`` where the stage is the artifact's stage (``datasets``, ``embeddings``,
``targets``, ``anchors``, ``runs``, ``eval``, ``reports``) and the event one of:

- ``part-written``: a part's data is written, its "finished" marker not yet;
- ``part-committed``: the marker is written (the part survives a crash);
- ``before-manifest``: every file is written, the manifest (the commit) not yet;
- ``committed``: the manifest is written;
- ``train-step`` (``runs`` only): a training step was logged, on every rank (e.g.
  ``runs:train-step@rank1@10``: rank 1 dies at its 10th logged step).

``sleep`` holds a process at a point for a test to kill it there: ``embeddings:part-committed@5=sleep:30``
holds the embed stage once its first shard is committed (a shard commits 5 files: its skipped list,
3 arrays, its part).

With the variable unset (always, outside tests) a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "LOCDIFF_FAULT"
EVENTS = ("part-written", "part-committed", "before-manifest", "committed")
_hits: dict[str, int] = {}


def _plan() -> dict[str, tuple[int, str]]:
    out = {}
    rank = os.environ.get("RANK", "0")
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        point, _, action = item.partition("=")
        name, *quals = point.split("@")
        if any(q.startswith("rank") and q != f"rank{rank}" for q in quals):
            continue  # another rank's
        nth = [q for q in quals if not q.startswith("rank")]
        out[name] = (int(nth[0] if nth else 1), action or "kill")
    return out


def point(name: str) -> None:
    """Reach the fault point ``name`` (see the module docstring)."""
    if ENV not in os.environ:
        return
    plan = _plan().get(name)
    if plan is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    nth, action = plan
    if _hits[name] != nth:
        return
    if action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
