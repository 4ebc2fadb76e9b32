"""How a plan step that could not complete says why."""

from __future__ import annotations


class StepFailed(Exception):
    """A plan step could not complete; ``reason`` is written for humans. ``exit`` says
    how the instance ended when the step failed because it died."""

    def __init__(self, reason: str, *, exit: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit = exit
