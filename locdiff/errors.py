"""Errors a user can act on: a one-line message and a hint, shown by the CLI without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, a server that is not running."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.message = message
        self.hint = hint


class StoreAccessError(UserError):
    """The storage (or a file) cannot be used: access denied, no such bucket, endpoint unreachable,
    read-only file system, disk full. Not a bug, and not "not committed"."""


_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
_CRED_HINT = (
    "check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile) and that they may "
    "use this bucket"
)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "") or None
    return None


def environment_error(exc: BaseException, where: str = "") -> StoreAccessError | None:
    """A one-line :class:`StoreAccessError` for an error of the environment (not a bug), else None.

    Names which it is: access denied, missing bucket, unreachable endpoint, read-only file system, no
    space left, permission denied. ``where`` (e.g. the storage URL) is added to the message. Messages
    never include credentials (botocore's and the OS's messages do not carry them).
    """
    import errno as _errno

    at = f" ({where})" if where else ""
    for e in _chain(exc):
        code = _client_code(e)
        name = type(e).__name__
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else name
        if code == "NoSuchBucket" or (isinstance(e, FileNotFoundError) and "bucket does not exist" in text):
            return StoreAccessError(
                f"the S3 bucket does not exist{at}: {text}", "create it, or fix the bucket in the storage URI"
            )
        if code in _ACCESS_CODES:
            return StoreAccessError(f"access denied by the S3 server{at}: {text}", _CRED_HINT)
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or (
            name == "ClientConnectorError"
        ):
            return StoreAccessError(
                f"cannot reach the storage endpoint{at}: {text}",
                "is the S3 server running? check LOCDIFF_S3_ENDPOINT / AWS_ENDPOINT_URL",
            )
        if isinstance(e, OSError):
            err = e.errno
            low = text.lower()
            if err == _errno.EROFS or "read-only file system" in low:
                return StoreAccessError(
                    f"read-only file system{at}: {text}",
                    "point --storage / LOCDIFF_STORAGE (or the output) at a writable location",
                )
            if err == _errno.ENOSPC or "no space left on device" in low:
                return StoreAccessError(f"no space left on device{at}: {text}", "free some space and re-run")
            if err == _errno.EDQUOT or "quota exceeded" in low:
                return StoreAccessError(f"disk quota exceeded{at}: {text}", "free some space and re-run")
            if isinstance(e, PermissionError):
                if err in (_errno.EACCES, _errno.EPERM):
                    return StoreAccessError(f"permission denied{at}: {text}", "check the file's permissions")
                return StoreAccessError(f"access denied{at}: {text}", _CRED_HINT)
            if isinstance(e, ConnectionError):
                return StoreAccessError(
                    f"cannot reach the storage endpoint{at}: {text}",
                    "is the server running? check LOCDIFF_S3_ENDPOINT / AWS_ENDPOINT_URL",
                )
    return None


# errors of a connection or a server that a later attempt can get past (by class name: botocore, aiohttp,
# urllib3, requests and http.client are not imported here)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
    "IncompleteRead", "RemoteDisconnected", "ChunkedEncodingError", "ProtocolError", "ResponseStreamingError",
}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "500", "502", "503", "504"}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: a dropped or refused connection, a timeout, a busy or failing server
    (S3 5xx / SlowDown), an I/O error of the OS other than a missing file, denied access or a full or
    read-only disk. Never a :class:`UserError` (bad input, a dataset that is not in the store, ...) nor a
    programming error (ValueError, KeyError, TypeError, ...): those fail the same way every time."""
    import errno as _errno

    chain = list(_chain(exc))
    if any(isinstance(e, UserError) for e in chain):
        return False
    permanent_os = (
        FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError
    )
    permanent_errno = {_errno.ENOSPC, _errno.EROFS, _errno.EDQUOT, _errno.EACCES, _errno.EPERM, _errno.ENOENT}
    for e in chain:
        if type(e).__name__ in _TRANSIENT_NAMES or _client_code(e) in _TRANSIENT_CODES:
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and not isinstance(e, permanent_os) and e.errno not in permanent_errno:
            return True
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only when its error :func:`is_transient`."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as read_error:  # the result could not be read back: a retry cannot make it worse
        exc = read_error
    return isinstance(exc, BaseException) and is_transient(exc)
