"""Why a volume failed: what the actors, tasks and driver report, and the commit protocol records as a row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """Why a volume failed, at which stage; `retry_on_resume` is False for errors of the input file itself."""

    stage: str
    error_type: str
    message: str
    retry_on_resume: bool = True
