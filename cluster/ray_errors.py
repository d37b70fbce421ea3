"""The error another actor or task raised, without Ray's wrapping.

A call whose remote side raised comes back as a ``RayTaskError`` — also an
instance of the raised error's class (``as_instanceof_cause``), so ``except
ValueError`` still catches it — whose message is Ray's whole remote traceback;
the error that was raised is its ``cause``. Every place in cluster/ that shows
such an error goes through here:

- ``remote_cause(e)``: that raised error (any other error as it is) — the
  launcher re-raises it, the CLI prints it;
- ``reason(e)``: one short line, ``"ValueError: unknown model ..."``, for a
  worker's ``WorkerState.error`` and the controller's events.

No Ray import: it only reads ``cause``.
"""

from __future__ import annotations


def remote_cause(e: BaseException) -> BaseException:
    """The error raised on the remote side of a ``RayTaskError``; ``e`` itself otherwise."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def reason(e: BaseException, limit: int = 300) -> str:
    """``"<type>: <message>"`` of ``remote_cause(e)``, at most ``limit`` characters."""
    e = remote_cause(e)
    return f"{type(e).__name__}: {e}".strip()[:limit]
