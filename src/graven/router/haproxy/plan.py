"""Pure planning for the HAProxy adapter: server names, weights on haproxy's scale,
haproxy's ``show stat`` rows, and the runtime-API commands that turn the servers
haproxy has into a desired backend set (in an order that never dips capacity)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from graven.router.base import Backend

HAPROXY_MAX_WEIGHT: Final = 256  # haproxy's own limit; graven weights go to 1000
_DYNAMIC_POOL: Final = "pool-max-conn -1 pool-purge-delay 5s"  # a static server's defaults


def server_name(backend_id: str) -> str:
    """The haproxy server name of a backend id.

    haproxy names allow ``[A-Za-z0-9_.:-]``; ids also allow ``@``. ``:`` escapes:
    ``::`` is a ``:`` and ``:a`` an ``@``, so the mapping is reversible and most ids
    keep their own name (it is what ``X-Graven-Backend`` and haproxy's stats show).
    """
    return backend_id.replace(":", "::").replace("@", ":a")


def backend_id(name: str) -> str:
    """Inverse of ``server_name``."""
    out: list[str] = []
    i = 0
    while i < len(name):
        if name[i] == ":" and i + 1 < len(name):
            out.append("@" if name[i + 1] == "a" else ":")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def haproxy_weights(backends: Sequence[Backend]) -> dict[str, int]:
    """Each backend's weight on haproxy's 0-256 scale, by id.

    Only ratios matter to round robin, so weights are scaled against the largest one
    in the set: 1:3 stays 85:256 instead of losing precision (or 1, 2 and 3 all
    becoming 1) on a fixed 1000-to-256 scale. A non-zero weight never becomes 0.
    """
    top = max((b.weight for b in backends), default=0)
    if top == 0:
        return {b.id: 0 for b in backends}
    return {
        b.id: max(1, round(b.weight * HAPROXY_MAX_WEIGHT / top)) if b.weight else 0
        for b in backends
    }


@dataclass(frozen=True)
class ServerRow:
    """One server line of haproxy's ``show stat``."""

    name: str
    address: str
    status: str  # "no check"/"UP" (ready), "DRAIN", "MAINT", ...
    weight: int  # user weight on haproxy's scale
    inflight: int  # scur + qcur
    requests: int  # stot: every time the server was picked, retried attempts included
    responses_5xx: int
    errors: int  # hrsp_5xx + econ + eresp + wretr + wredis

    @property
    def state(self) -> str:
        """``ready``, ``drain`` or ``maint``."""
        status = self.status.upper()
        if status.startswith("MAINT"):
            return "maint"
        if status.startswith("DRAIN"):
            return "drain"
        return "ready"


def parse_show_stat(text: str, proxy: str) -> list[ServerRow]:
    """The server rows of ``proxy`` in ``show stat`` CSV output, in haproxy's order."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not 'show stat' output: {text[:200]!r}")
    header = lines[0][2:].split(",")
    col = {name: i for i, name in enumerate(header)}
    for needed in ("pxname", "svname", "qcur", "scur", "stot", "status", "weight"):
        if needed not in col:
            raise ValueError(f"'show stat' lacks the {needed!r} column")

    def num(fields: list[str], name: str) -> int:
        i = col.get(name)
        if i is None or i >= len(fields) or not fields[i]:
            return 0
        return int(fields[i])

    rows: list[ServerRow] = []
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) < len(col) - 1 or fields[col["pxname"]] != proxy:
            continue
        name = fields[col["svname"]]
        if name in ("FRONTEND", "BACKEND"):
            continue
        hrsp_5xx = num(fields, "hrsp_5xx")
        # An attempt that got no answer ends in econ/eresp, or, when haproxy tried
        # again, in wretr (same server) or wredis (another one): the request
        # survived, but this server failed it all the same.
        failed = sum(num(fields, f) for f in ("econ", "eresp", "wretr", "wredis"))
        rows.append(
            ServerRow(
                name=name,
                address=fields[col["addr"]] if "addr" in col else "",
                status=fields[col["status"]],
                weight=num(fields, "uweight") if "uweight" in col else num(fields, "weight"),
                inflight=num(fields, "scur") + num(fields, "qcur"),
                requests=num(fields, "stot"),
                responses_5xx=hrsp_5xx,
                errors=hrsp_5xx + failed,
            )
        )
    return rows


@dataclass(frozen=True)
class Desired:
    """One backend of the desired set as haproxy will get it."""

    backend: Backend
    address: str  # resolved, haproxy syntax: 1.2.3.4:80 or [::1]:80

    @property
    def name(self) -> str:
        return server_name(self.backend.id)


@dataclass(frozen=True)
class Step:
    """One runtime-API command. ``may_fail`` steps (deleting a server that a request
    reached in the meantime) leave the server lingering instead of failing the call."""

    command: str
    may_fail: bool = False


def plan_changes(proxy: str, desired: Sequence[Desired], rows: Sequence[ServerRow]) -> list[Step]:
    """Runtime-API commands that turn haproxy's ``rows`` into the ``desired`` set.

    New ready servers and those gaining weight come first, ready servers losing weight
    next, drained or removed ones last, so capacity never dips during a swap (in a
    blue-green switch no moment has every server at weight 0). Servers no longer
    wanted are drained, and deleted at once when nothing is in flight on them.
    """
    weights = haproxy_weights([d.backend for d in desired])
    current = {r.name: r for r in rows}
    wanted = {d.name for d in desired}
    first: list[Step] = []
    lowered: list[Step] = []
    last: list[Step] = []
    for d in desired:
        ref = f"{proxy}/{d.name}"
        weight = weights[d.backend.id]
        row = current.get(d.name)
        if row is None:
            # haproxy 2.6 gives a dynamic server no pool of idle server connections
            # unless asked (static ones have one): without it, every request would
            # open a new connection to the backend.
            steps = [
                Step(f"add server {ref} {d.address} weight {weight} {_DYNAMIC_POOL}"),
                Step(f"set server {ref} state {d.backend.state}"),
            ]
        else:
            steps = []
            if row.address != d.address:
                host, _, port = d.address.rpartition(":")
                steps.append(Step(f"set server {ref} addr {host.strip('[]')} port {port}"))
            re_weight = [Step(f"set weight {ref} {weight}")] if row.weight != weight else []
            re_state = (
                [Step(f"set server {ref} state {d.backend.state}")]
                if row.state != d.backend.state
                else []
            )
            # Drain before the weight moves, and re-weight before getting ready, so
            # a server never takes traffic in a state nobody asked for.
            if d.backend.state == "drain":
                steps += re_state + re_weight
            else:
                steps += re_weight + re_state
        if d.backend.state == "drain":
            last.extend(steps)
        elif row is not None and weight < row.weight:
            lowered.extend(steps)
        else:
            first.extend(steps)
    for row in rows:
        if row.name in wanted:
            continue
        last.extend(removal_steps(proxy, row))
    return first + lowered + last


def removal_steps(proxy: str, row: ServerRow) -> list[Step]:
    """Drain a server that is no longer wanted; delete it if nothing is in flight."""
    ref = f"{proxy}/{row.name}"
    if row.inflight > 0:
        return [] if row.state != "ready" else [Step(f"set server {ref} state drain")]
    steps = [] if row.state == "maint" else [Step(f"set server {ref} state maint")]
    return [*steps, Step(f"del server {ref}", may_fail=True)]
