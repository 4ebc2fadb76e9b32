"""The graven exception tree.

Every error a user can cause or meet is a ``GravenError``; the CLI turns it into a
message and an exit code, never a traceback (unless ``--debug``)::

    GravenError                      exit 1 unless said otherwise
    ├── UsageError                   exit 2: bad arguments or invalid input
    │   ├── SpecError                graven.yaml problems, each with file:line and key path
    │   ├── NotFoundError            a named image, service, release or instance is unknown
    │   ├── BadRequest               the controller's API refused a request (its HTTP status)
    │   └── ImportRejected           an image to import is malformed or unsafe
    ├── BuildError                   a recipe step failed
    │   └── SandboxUnavailable       run steps cannot be isolated here
    ├── StoreError                   the content store is missing or corrupt data
    │   └── TreePathError            a path inside an image tree cannot be used as asked
    ├── RegistryError                a registry refused, failed, or sent an untrusted reply
    │   ├── RegistryAuthError        it wants other credentials (401) or denies (403)
    │   ├── RegistryNotFound         no such repository, tag or blob there
    │   └── RegistryUnavailable      down, unreachable, too slow or failing after retries
    ├── DiskError                    a filesystem refused a write: full, over quota, read-only
    ├── StateAccessError             the state dir is not this user's to read
    ├── SecretMissing                a release refers to a secret the state dir lacks
    ├── RuntimeFailure               an instance could not be started or stopped
    ├── RouterError                  the router process failed or refused a change
    ├── ControllerError              the controller is unreachable or refused a request
    │   └── ControllerNotRunning     nothing listens on its socket: no request reached it
    ├── RolloutFailed                a rollout could not finish and was rolled back
    ├── LedgerTampered               ``audit --verify`` found an altered entry
    └── InternalError                a broken invariant: please report

The subclasses this module does not define live beside the code that raises them:
``BadRequest`` in ``graven.controller.api``, ``ImportRejected`` in
``graven.store.oci_import``, ``SandboxUnavailable`` in ``graven.build.sandbox``,
``TreePathError`` in ``graven.store.cas``, the ``Registry*`` errors in
``graven.store.registry`` and ``SecretMissing`` in ``graven.controller.secret_store``.
A test holds this tree to the classes that exist.
"""

from __future__ import annotations

from typing import NamedTuple


class GravenError(Exception):
    """Root of every error graven raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"error": type(self).__name__, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class UsageError(GravenError):
    """Bad arguments or invalid input: the user can fix it."""

    exit_code = 2


class NotFoundError(UsageError):
    """A named object does not exist."""


class SpecProblem(NamedTuple):
    """One problem in a spec file, located precisely.

    A NamedTuple, not a dataclass: every CLI start imports this module, and importing
    ``dataclasses`` (and with it ``inspect``) is a large share of a lean start-up."""

    file: str
    line: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "key_path": self.key_path,
            "message": self.message,
        }


class SpecError(UsageError):
    """The spec is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[SpecProblem], *, hint: str | None = None) -> None:
        self.problems = problems
        text = "\n".join(str(p) for p in problems)
        super().__init__(
            text or "invalid spec",
            hint=hint or "Fix the spec, then run 'graven check' to validate it.",
        )

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["problems"] = [p.to_dict() for p in self.problems]
        return out


class BuildError(GravenError):
    """A recipe step failed or its inputs are unusable."""


class StoreError(GravenError):
    """The content store lacks an object or holds a corrupt one."""


class DiskError(GravenError):
    """A filesystem refused a write: no space left, over quota or read-only. ``errno``
    says which."""

    def __init__(self, message: str, *, hint: str | None = None, errno: int = 0) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno


class StateAccessError(GravenError):
    """The state dir or a file in it cannot be read by this user (it is private to
    the user that owns it)."""


class RuntimeFailure(GravenError):
    """An instance could not be started, observed or stopped."""


class RouterError(GravenError):
    """The router process failed or refused a change."""


class ControllerError(GravenError):
    """The controller is unreachable or refused a request."""


class ControllerNotRunning(ControllerError):
    """Nothing listens on the controller's socket, so the request reached no controller
    (safe to start one and send it again)."""


class RolloutFailed(GravenError):
    """A rollout could not finish; the previous release keeps serving."""


class LedgerTampered(GravenError):
    """The ledger's hash chain is broken at ``seq``."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        super().__init__(
            f"ledger entry #{seq} was altered: {reason}",
            hint="Entries after it cannot be trusted; restore the state database from backup.",
        )


class InternalError(GravenError):
    """A broken invariant inside graven: please report it."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message, hint="This is a bug in graven; please report it with 'graven --debug'."
        )
