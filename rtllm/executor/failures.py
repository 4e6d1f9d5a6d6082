"""How the multi-process executor describes a worker's failure to the callers whose requests it ends.

Which rank is named when the model is split across ranks: a rank that stops (killed, or raising) makes
its peers fail in their next collective, and they report that too. The cause is then a rank killed by
a signal (it reports nothing), else the earliest report: each ``Fatal`` carries when it failed, and a
rank's peers fail only after it stopped, which is after it made its report. Rank 0's per-request
errors of a failed step (``step_failed``) wait for that verdict instead of racing it.
"""

from __future__ import annotations

import signal
import sys

from rtllm.runtime.scheduler import RequestUpdate


class RemoteTraceback(Exception):
    """The worker's traceback, attached as __cause__ of an error re-raised here."""

    def __str__(self) -> str:
        return "\n(in the engine worker process)\n" + self.args[0]


def step_failed(u: RequestUpdate) -> bool:
    """An update the engine loop sends when a whole step failed (every request aborted with the error)."""
    return u.error is not None and u.finish_reason == "abort"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown)"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def bootstrap_hint(code: int | None) -> str:
    """Why a worker can exit with code 1 without sending its start-up error: it failed before rtllm's
    worker code ran, most often re-importing a main script that starts an LLM without a main guard."""
    if code != 1:
        return ""
    hint = " before it reached rtllm's worker code (its stderr says why)"
    if getattr(sys.modules.get("__main__"), "__file__", None):
        hint += ("; the worker is a spawned process that re-imports the main script: if that script creates "
                 "the LLM at module level, move it under `if __name__ == '__main__':`")
    return hint
