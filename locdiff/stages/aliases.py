"""Model aliases: human names (``prod``, ``candidate``) for committed runs, kept in the store.

``aliases/<name>/<hash>``: one small committed artifact per change. Tagging writes an artifact whose
manifest says ``action="tag"`` and ``run=<run key>`` (the run is its ``upstream``); untagging writes
one with ``action="untag"`` and no run. The alias's current target is its newest artifact, so the
whole history stays in the store and in the catalog (view ``aliases``: one row per change, ``current``
marks each name's newest). Nothing is ever overwritten: the change's timestamp is part of its config,
so every change has its own key.

Readers: ``locdiff predict/evaluate/serve --model NAME`` and the nightly ``evaluate-latest`` (which
follows ``prod`` when it exists) resolve names through :func:`resolve_run`.
"""

from __future__ import annotations

import datetime as _dt
import json
import re

from locdiff.errors import UserError
from locdiff.stages import get_or_build
from locdiff.storage import Store

STAGE = "aliases"
FILE = "alias.json"
PROD = "prod"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")


LATEST = "latest"  # reserved: always the newest committed run


def check_name(name: str) -> str:
    if name == LATEST:
        raise UserError(f"{LATEST!r} is reserved (it always means the newest run)", "pick another name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UserError(
            f"invalid model name {name!r}",
            "a name starts with a letter and holds letters, digits, '.', '_' or '-' (at most 64), e.g. prod",
        )
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _write(store: Store, name: str, run_key: str | None, action: str) -> str:
    record = {"alias": name, "run": run_key, "action": action, "at": _now()}

    def build(w) -> None:
        w.write_bytes(FILE, json.dumps(record, sort_keys=True).encode())
        w.set(alias=name, run=run_key, action=action)

    return get_or_build(store, STAGE, name, record, [run_key] if run_key else [], build)


def _check_run(store: Store, run_key: str) -> str:
    if not isinstance(run_key, str) or not run_key.startswith("runs/"):
        raise UserError(
            f"{run_key!r} is not a run key", "run keys look like runs/NAME/HASH (`locdiff runs list`)"
        )
    try:
        ok = store.exists(run_key)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"no committed run {run_key!r} in {store.url}", "see `locdiff runs list`")
    return run_key


def tag(store: Store, run_key: str, name: str) -> str:
    """Point ``name`` at ``run_key`` (a committed run); returns the alias artifact's key."""
    check_name(name)
    return _write(store, name, _check_run(store, run_key), "tag")


def untag(store: Store, name: str) -> str:
    """Remove ``name`` (it must currently point at a run); returns the alias artifact's key."""
    check_name(name)
    if current(store).get(name) is None:
        raise UserError(f"no model is named {name!r}", "see `locdiff runs list` for the current names")
    return _write(store, name, None, "untag")


def history(store: Store) -> list[dict]:
    """Every alias change, oldest first: key, alias, run, action, created_at."""
    return [
        {
            "key": m["key"],
            "alias": m.get("alias"),
            "run": m.get("run"),
            "action": m.get("action"),
            "created_at": m.get("created_at"),
        }
        for m in store.list(STAGE)
    ]


def current(store: Store) -> dict[str, str]:
    """name -> run key for every alias whose newest change is a tag."""
    out: dict[str, str | None] = {}
    for h in history(store):
        out[h["alias"]] = h["run"] if h["action"] == "tag" else None
    return {k: v for k, v in out.items() if v}


def resolve_alias(store: Store, name: str) -> str | None:
    """The run ``name`` points at now, or None."""
    return current(store).get(name)


def resolve_run(store: Store, ref: str | None) -> str:
    """A run key from a model reference: a run key, an alias name, or None / ``latest`` (the newest
    committed run)."""
    if ref is None or ref == LATEST:
        key = store.latest("runs")
        if key is None:
            raise UserError("no trained run in the store", "run `locdiff demo` (or train-mp16) first")
        return key
    if "/" in ref:
        return _check_run(store, ref)
    run = resolve_alias(store, check_name(ref))
    if run is None:
        names = ", ".join(sorted(current(store))) or "none yet"
        raise UserError(
            f"no model is named {ref!r} (names: {names})",
            "pass a run key, or name one with `locdiff runs tag RUN_KEY NAME`",
        )
    if not store.exists(run):
        raise UserError(f"{ref!r} points at {run}, which is no longer in the store", "re-tag it")
    return run


def default_run(store: Store) -> str:
    """The model to use when none is named: ``prod`` when it exists, else the newest run."""
    return resolve_alias(store, PROD) or resolve_run(store, None)
