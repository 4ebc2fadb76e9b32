"""The registry error tree: every failure of a registry exchange is one of these.

::

    GravenError
    └── RegistryError              the registry refused or failed, or replied nonsense (exit 1)
        ├── RegistryAuthError      401/403: which credentials to provide
        ├── RegistryNotFound       404: names the missing repository, tag or blob
        └── RegistryUnavailable    down, unreachable, timing out or 5xx after retries
"""

from __future__ import annotations

from graven.errors import GravenError


class RegistryError(GravenError):
    """A registry refused a request, failed, or sent a reply graven cannot trust."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        registry: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.registry = registry
        self.status = status

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.registry:
            out["registry"] = self.registry
        if self.status is not None:
            out["status"] = self.status
        return out


class RegistryAuthError(RegistryError):
    """The registry (or its token service) wants other credentials (401) or denies (403)."""


class RegistryNotFound(RegistryError):
    """The repository, tag or blob asked for does not exist on the registry."""


class RegistryUnavailable(RegistryError):
    """The registry is down, unreachable, too slow, or failing (5xx) after retries."""
