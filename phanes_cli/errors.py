"""Errors a user sees: each carries a readable message and never needs a traceback to be understood."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType


class PhanesError(Exception):
    """Base of every error phanes reports to a user as a message instead of a traceback."""


class InputError(PhanesError):
    """An input file that cannot be used; the message names the file and the reason.

    `retryable` is False: the file itself is bad, so a resumed run must not try it again unchanged.
    """

    retryable = False

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class InputAccessError(InputError):
    """An input that exists but cannot be read now (permission denied): worth retrying on resume.

    Reading it may succeed once its permissions are fixed, while the file's content and signature stay
    the same, so this failure must not be remembered as a property of the file.
    """

    retryable = True


class QualityError(InputError):
    """A volume that loads but holds nothing to screen (quality.FATAL: all zero, constant, empty brain mask)."""


class ConfigError(PhanesError):
    """A run configuration (YAML or CLI options) that is missing a value or holds an invalid one."""


class WeightsError(PhanesError):
    """Pretrained backbone weights that cannot be found; the message lists every way to provide them."""


class MissingExtraError(PhanesError):
    """A feature whose optional dependency (a pyproject extra) is not installed; the message names the extra."""


class BundleError(PhanesError):
    """A model bundle that is incomplete, tampered with, or made by an incompatible version."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop), raised in the main thread so a run stops as cleanly as on Ctrl-C."""


_SIGTERM_RECEIVED = threading.Event()
_SIGINT_RECEIVED = threading.Event()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    _SIGTERM_RECEIVED.set()
    raise Terminated()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    _SIGINT_RECEIVED.set()
    raise KeyboardInterrupt


def stop_on_sigterm(fresh: bool = False) -> None:
    """Make SIGTERM raise `Terminated` in the main thread (Ray's init installs its own handler: call again after),
    and record SIGINT as well as raising KeyboardInterrupt.

    The record is what `raise_if_interrupted` reads: an interrupt raised where Python cannot propagate it (in
    a finaliser or a callback from compiled code, which print "Exception ignored" and carry on) would otherwise
    be lost, and the run would end "finished" with exit 0. A SIGINT the process was started ignoring (a
    background job of a shell without job control) stays ignored, as for any program. `fresh` forgets the
    signals of an earlier command in this process (the CLI calls it so per command).
    """
    if fresh:
        _SIGTERM_RECEIVED.clear()
        _SIGINT_RECEIVED.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _raise_interrupted)


def raise_if_interrupted() -> None:
    """Raise the interrupt again when SIGINT or SIGTERM arrived since `stop_on_sigterm(fresh=True)`, whether or not
    its exception got through: called where a run decides it finished."""
    if _SIGTERM_RECEIVED.is_set():
        raise Terminated()
    if _SIGINT_RECEIVED.is_set():
        raise KeyboardInterrupt


def is_termination(exc: BaseException) -> bool:
    """True when an interrupt came from SIGTERM.

    Ray's blocking calls (`ray.get`, `ray.wait`) turn any exception a signal handler raises into a new,
    plain KeyboardInterrupt, so the type alone would report a scheduler's stop as a Ctrl-C.
    """
    return isinstance(exc, Terminated) or _SIGTERM_RECEIVED.is_set()
