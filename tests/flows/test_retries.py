"""Retries only where they can help (issue 24): an I/O task retries a transient error and succeeds, and
fails at once on a UserError or a programming error, through Prefect's retry_condition_fn."""

from __future__ import annotations

import pytest
from prefect import flow

from locdiff.errors import StoreAccessError, UserError, is_transient
from locdiff.flows import tasks


def _flaky(errors: list[BaseException], calls: list[int]):
    def fetch(storage: str | None, name: str) -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return f"datasets/{name}"

    return fetch


def _run(fn):
    # the I/O tasks' policy, without the waits and without the cache (each test calls it afresh)
    t = tasks.stage_task("datasets", fn, timeout_seconds=60, name="flaky").with_options(
        retry_delay_seconds=0, retry_jitter_factor=None, cache_policy=tasks.NO_CACHE
    )

    @flow(name="retry-test")
    def one() -> str:
        return t(None, "mp16")

    return one()


def test_a_transient_error_is_retried_and_succeeds(prefect_harness):
    calls: list[int] = []
    assert _run(_flaky([ConnectionResetError(104, "Connection reset by peer")], calls)) == "datasets/mp16"
    assert len(calls) == 2


@pytest.mark.parametrize(
    "error",
    [
        UserError("dataset 'mp16' is not in the store", "run `locdiff datasets prepare mp16`"),
        ValueError("max_degree must be >= 1"),
    ],
)
def test_a_deterministic_error_fails_at_once(prefect_harness, error):
    calls: list[int] = []
    with pytest.raises(type(error)):
        _run(_flaky([error, error, error, error], calls))
    assert len(calls) == 1


def test_every_retried_task_is_conditioned_on_the_error():
    retried = [t for t in vars(tasks).values() if hasattr(t, "retry_condition_fn") and t.retries]
    assert {t.name for t in retried} >= {"prepare-dataset", "embed", "embed-shard", "targets", "retrieval"}
    assert all(t.retry_condition_fn is tasks.retry_if_transient for t in retried)


def test_what_counts_as_transient():
    class EndpointConnectionError(Exception):  # botocore's, by name
        pass

    assert is_transient(TimeoutError("read timed out")) and is_transient(EndpointConnectionError("x"))
    assert is_transient(OSError(5, "Input/output error"))
    assert not is_transient(FileNotFoundError(2, "no such file"))
    assert not is_transient(StoreAccessError("cannot reach the storage endpoint"))
    assert not is_transient(KeyError("x")) and not is_transient(OSError(28, "No space left on device"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = ConnectionResetError(104, "reset")
    assert is_transient(wrapped)
