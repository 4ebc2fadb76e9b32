"""Registry references: ``HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`` as a value type.

Parsed once, where the text comes in (CLI arguments, spec ``base.registry``), and
trusted afterwards; the registry client, push and pull and the builder take a
``RegistryRef``. The grammar is the distribution spec's, with one difference: the host
is required (graven has no default registry).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from graven.errors import UsageError
from graven.model import Digest, is_valid_name

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_MAX_REPOSITORY = 255
_REF_HINT = "Write HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST], e.g. localhost:5000/team/web:v1."


def split_host(registry: str) -> str:
    """The host of ``host[:port]`` (an IPv6 address keeps its brackets)."""
    match = _HOST_RE.match(registry)
    return match["host"] if match else registry


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name, an address, or a bracketed IPv6 address) is this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RegistryRef:
    """``registry/repository[:tag][@digest]``: where an image lives on a registry."""

    registry: str  # host[:port], as written
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    @property
    def host(self) -> str:
        return split_host(self.registry)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> RegistryRef:
    """Parse ``HOST[:PORT]/REPO[/PATH...][:TAG][@sha256:...]``; UsageError says what is wrong.

    The host is required (graven has no default registry): the first component must be
    ``localhost``, carry a dot or a port, or be a bracketed IPv6 address.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid registry reference {text!r}: {why}", hint=_REF_HINT)

    if "://" in text:
        raise UsageError(
            f"invalid registry reference {text!r}: references have no scheme",
            hint="Drop 'http://' or 'https://'; pass --insecure to use plain HTTP. " + _REF_HINT,
        )
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest_text = rest.partition("@")
        try:
            digest = Digest(digest_text)
        except ValueError:
            raise bad(f"{digest_text!r} after '@' is not sha256:<64 hex>") from None
    host, slash, path = rest.partition("/")
    if not slash or not path:
        raise bad("expected a registry host, then '/' and a repository")
    match = _HOST_RE.match(host)
    if match is None:
        raise bad(f"{host!r} is not a registry host")
    if not ("." in host or ":" in host or host == "localhost" or host.startswith("[")):
        raise bad(
            f"it must start with the registry host ({host!r} has no dot or port and is not "
            "'localhost'; graven has no default registry)"
        )
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(match["host"].strip("[]"))
        except ValueError:
            raise bad(f"{match['host']} is not an IPv6 address") from None
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise bad(f"port {match['port']} is out of range")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise bad(f"tag {tag!r} must be 1-128 of letters, digits, '_', '.', '-'")
    if len(path) > _MAX_REPOSITORY:
        raise bad(f"the repository name is longer than {_MAX_REPOSITORY} characters")
    for component in path.split("/"):
        if not _COMPONENT_RE.match(component):
            raise bad(
                f"repository component {component!r} must be lowercase letters and digits, "
                "separated by '.', '_', '__' or '-'"
            )
    return RegistryRef(host, path, tag, digest)


def local_name_for(repository: str) -> str:
    """The default local image name for a pulled repository: its last component,
    made a valid graven name (``team/My_App.v2`` -> ``my-app-v2``)."""
    last = repository.rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", last).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:63].rstrip("-")
    return name if is_valid_name(name) else "image"


def is_repository_name(text: str) -> bool:
    """Whether ``text`` is a repository name: '/'-separated components of the grammar."""
    return all(map(_COMPONENT_RE.match, text.split("/")))
