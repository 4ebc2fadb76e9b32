"""Who holds a TCP port: for 'port 8080 on 127.0.0.1 is in use by pid 4121 (nginx)'.

Standard library only. On Linux the listening socket is found in ``/proc/net/tcp``
and ``/proc/net/tcp6`` (by its inode), and its owner by the ``/proc/PID/fd`` entry
that links to ``socket:[INODE]``. Processes of other users cannot be looked into: the
port is then reported in use by an unknown process. Where ``/proc`` says nothing (or
does not exist), a bind probe still tells whether the port is free.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN, as /proc/net/tcp spells the state
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class PortHolder:
    """A TCP port already taken on ``host``, and by whom when that can be found out.

    ``pids`` lists every process with the listening socket open (forked workers share
    it), lowest first; empty when the owner cannot be seen. ``name`` is the first
    one's command name (``/proc/PID/comm``)."""

    host: str
    port: int
    pids: tuple[int, ...] = ()
    name: str | None = None

    @property
    def pid(self) -> int | None:
        return self.pids[0] if self.pids else None

    def describe(self) -> str:
        """``port 8080 on 127.0.0.1 is in use by pid 4121 (nginx)``, or ``... is in use``."""
        text = f"port {self.port} on {self.host} is in use"
        if self.pid is not None:
            text += f" by pid {self.pid}"
            if self.name:
                text += f" ({self.name})"
        return text


def port_holder(host: str, port: int, *, proc: Path = Path("/proc")) -> PortHolder | None:
    """Who listens on ``host:port`` (TCP), or None when the port is free there.

    A listener on the wildcard address (``0.0.0.0``, ``::``) holds the port on every
    host address too.
    """
    address = ipaddress.ip_address(host)
    inodes = _listening_inodes(address, port, proc)
    if inodes:
        pids = _socket_owners(inodes, proc)
        name = _command_name(pids[0], proc) if pids else None
        return PortHolder(host, port, pids, name)
    if _bind_refused(address, port):
        return PortHolder(host, port)
    return None


def descends_from(pid: int, ancestor: int, *, proc: Path = Path("/proc")) -> bool:
    """True if ``pid`` is ``ancestor`` or one of its descendants."""
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        parent = _parent_pid(pid, proc)
        if parent is None:
            return False
        pid = parent
    return pid == ancestor


# --- /proc -------------------------------------------------------------------------------


def _listening_inodes(address: _IPAddress, port: int, proc: Path) -> set[int]:
    found: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local, _, hex_port = fields[1].partition(":")
            try:
                if int(hex_port, 16) != port:
                    continue
                listener = _proc_address(local)
            except ValueError:
                continue
            if _covers(listener, address) and fields[9].isdigit() and fields[9] != "0":
                found.add(int(fields[9]))
    return found


def _proc_address(text: str) -> _IPAddress:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host byte order."""
    raw = bytes.fromhex(text)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an address: {text!r}")
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    packed = b"".join(int.from_bytes(w, sys.byteorder).to_bytes(4, "big") for w in words)
    return ipaddress.ip_address(packed)


def _covers(listener: _IPAddress, address: _IPAddress) -> bool:
    """Whether a socket listening on ``listener`` takes the port from ``address``."""
    listener, address = _unmapped(listener), _unmapped(address)
    # 0.0.0.0 holds every IPv4 address; :: (dual-stack by default) every address.
    if listener.is_unspecified:
        return listener.version in (address.version, 6)
    if address.is_unspecified:
        return address.version in (listener.version, 6)
    return listener == address


def _unmapped(address: _IPAddress) -> _IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _socket_owners(inodes: set[int], proc: Path) -> tuple[int, ...]:
    links = {f"socket:[{inode}]" for inode in inodes}
    owners: list[int] = []
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return ()
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(Path(entry.path) / "fd")
        except OSError:  # another user's process, or gone
            continue
        with fds:
            for fd in fds:
                try:
                    if str(Path(fd.path).readlink()) in links:
                        owners.append(int(entry.name))
                        break
                except OSError:
                    continue
    return tuple(sorted(owners))


def _command_name(pid: int, proc: Path) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or None
    except OSError:
        return None


def _parent_pid(pid: int, proc: Path) -> int | None:
    try:
        # The command name may hold spaces and parentheses: split after the last ')'.
        return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- the probe ---------------------------------------------------------------------------


def _bind_refused(address: _IPAddress, port: int) -> bool:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As a server binds: a port left in TIME_WAIT by a closed listener is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((str(address), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False
