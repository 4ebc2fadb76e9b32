"""One builder of ``graven.yaml`` text for the demo, the tests and the benches.

The example service (``hello``: the scaffolded app under ``/app``, health on
``/healthz``) is written the same way everywhere; callers change only what their case
is about (replicas, strategy, env...). Values go through a YAML writer, so a version or
env value is always quoted as it must be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

# The example app is standard-library Python: it runs on this host's Python, which the
# recipe puts into the image (instances see nothing of the host's).
HELLO_BASE = "host-python"
HELLO_STEPS: tuple[Mapping[str, str], ...] = (
    {"copy": "app", "to": "/app"},
    {"workdir": "/app"},
    {"entrypoint": "python3 app.py"},
)


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key, as people write graven.yaml."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def render(doc: Mapping[str, Any], *, comment: str = "") -> str:
    """A spec document as YAML: ``version: 1`` first, keys in the order given."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.dump(
        {"version": 1, **doc}, Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )
    return head + body


def hello_service(
    *,
    port: int,
    version: str,
    replicas: int = 3,
    health_path: str = "/healthz",
    health_interval: str = "0.5s",
    start_timeout: str | None = None,
    drain_timeout: str = "5s",
    stop_grace: str = "5s",
    strategy: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    health: dict[str, Any] = {"path": health_path, "interval": health_interval}
    if start_timeout is not None:
        health["start_timeout"] = start_timeout
    service: dict[str, Any] = {
        "image": "hello",
        "replicas": replicas,
        "port": port,
        "health": health,
        "drain_timeout": drain_timeout,
        "stop_grace": stop_grace,
    }
    if strategy:
        service["strategy"] = dict(strategy)
    service["env"] = {"VERSION": version, **(env or {})}
    if volumes:
        service["volumes"] = [dict(v) for v in volumes]
    return service


def hello_spec(*, comment: str = "", **service: Any) -> str:
    """The example service's whole spec; ``service`` as for ``hello_service``."""
    return render(
        {
            "images": {"hello": {"base": HELLO_BASE, "steps": [dict(s) for s in HELLO_STEPS]}},
            "services": {"hello": hello_service(**service)},
        },
        comment=comment,
    )
