"""Whether this machine can seal an instance, and why not when it cannot.

The ``process`` runtime seals an instance with bubblewrap: the image as its read-only
root, its own pid, ipc, uts, mount and (for a non-root uid) user namespaces, no
capabilities, ``no_new_privs``. That needs the ``bwrap`` program and, for anything but
root inside, user namespaces this user may create. ``probe`` tries exactly that once
per process (a ~20 ms run of ``/bin/true``) and says plainly what is missing.

``GRAVEN_BWRAP`` names the bubblewrap program (default: ``bwrap`` on PATH); set it to
``none`` to run instances unsealed on purpose.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final, NamedTuple

from graven.runtime.image_user import NOBODY

BWRAP_ENV: Final = "GRAVEN_BWRAP"
SEALED: Final = "sealed"
NONE: Final = "none"
_PROBE_TIMEOUT = 10.0


class IsolationSupport(NamedTuple):
    """How instances run here: ``sealed`` (with ``bwrap``, its path) or not (``reason``)."""

    sealed: bool
    bwrap: str = ""
    reason: str = ""

    @property
    def mode(self) -> str:
        return SEALED if self.sealed else NONE

    def describe(self) -> str:
        """``sealed``, or ``none (why)``: what ``status`` and ``check`` show."""
        return SEALED if self.sealed else f"{NONE} ({self.reason})"

    def to_dict(self) -> dict[str, str]:
        out = {"mode": self.mode}
        if self.reason:
            out["reason"] = self.reason
        return out


def bwrap_program() -> str | None:
    """The bubblewrap program to use, or None when there is none (or it is turned off)."""
    named = os.environ.get(BWRAP_ENV, "")
    if named == NONE:
        return None
    if named:
        return named if Path(named).is_file() and os.access(named, os.X_OK) else None
    return shutil.which("bwrap")


@functools.cache
def probe() -> IsolationSupport:
    """Can an instance be sealed here? Tried once per process (see the module doc)."""
    named = os.environ.get(BWRAP_ENV, "")
    if named == NONE:
        return IsolationSupport(False, reason=f"turned off by {BWRAP_ENV}=none")
    bwrap = bwrap_program()
    if bwrap is None:
        where = named or "PATH"
        return IsolationSupport(
            False, reason=f"bubblewrap (bwrap) not found on {where}; install it"
        )
    root = os.geteuid() == 0
    if root:
        # As root, an instance's bubblewrap runs as its uid after a private mount
        # namespace shows it the image under /mnt (runtime/process.py).
        lacking = [tool for tool in ("unshare", "setpriv", "mount") if shutil.which(tool) is None]
        if lacking:
            return IsolationSupport(
                False, reason=f"{', '.join(lacking)} not found (util-linux); install it"
            )
        if not Path("/mnt").is_dir():
            return IsolationSupport(False, reason="no /mnt directory to stage images at")
    argv = [bwrap, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL"]
    # As root, instances run as another uid in their own user namespace; as anyone
    # else, a user namespace is the only way bubblewrap can make the others.
    argv += ["--unshare-user", "--", "/bin/true"]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
            user=NOBODY if root else None,
            group=NOBODY if root else None,
            extra_groups=[] if root else None,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return IsolationSupport(False, reason=f"{bwrap} cannot run: {exc}")
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        who = "" if root else " by this user (not root)"
        return IsolationSupport(
            False,
            reason=f"user namespaces cannot be created{who}: {said[0].removeprefix('bwrap: ')}",
        )
    return IsolationSupport(True, bwrap=bwrap)


def describe_isolation(runtime: object) -> str | None:
    """What ``status`` says of how ``runtime`` runs instances here, if it seals."""
    support = getattr(runtime, "isolation", None)
    return support.describe() if isinstance(support, IsolationSupport) else None
