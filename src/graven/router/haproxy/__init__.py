"""The HAProxy Router adapter: one ``haproxy`` process per service, driven through its
runtime API.

Modules: ``plan`` (pure: a desired backend set and haproxy's ``show stat`` rows ->
runtime-API commands), ``config`` (pure: the generated haproxy.cfg), ``adapter``
(``HAProxyRouter``, the Router port: processes, files, the runtime API) and
``collector`` (the latency collector process beside each haproxy).

Each service gets its own haproxy, started detached (its own session) so it outlives
the controller, plus a small latency collector beside it (see below). Backends are
haproxy servers named after their ids; ``set_backends`` turns a backend set into
runtime-API commands (``add server``, ``set weight``, ``set server ... state``,
``del server``), so a change never reloads haproxy and never drops a request.

Persistence. A reload or restart of haproxy forgets runtime-API changes, so after
every change graven also rewrites ``haproxy.cfg`` with the current set as static
``server`` lines (a drained backend gets ``weight 0`` there, the same effect on load
balancing) and keeps the set itself in ``backends.json``. A restarted haproxy thus
serves the same backends from its first request; ``ensure`` then re-applies the exact
states and weights through the runtime API. An operator's own reload of
``haproxy.cfg`` (``haproxy -f haproxy.cfg -x admin.sock -sf PID``) is just as safe:
``ensure`` adopts the new process and re-applies the states the same way.

Traffic. Each request is balanced on its own (round robin, weights scaled to
haproxy's 0-256), answers carry ``X-Graven-Backend`` (the server name), and a server
that refuses, resets or never answers costs a retry on another server instead of a
failed request: always when the connection failed, and for idempotent methods also
after an empty answer. Idle connections to backends are pooled and reused.

Removal. A backend left out of a set is drained; it is deleted (``maint``, then
``del server``) as soon as haproxy reports no request in flight on it. graven has no
process of its own beside haproxy to watch for that moment, so every
``set_backends`` and ``stats`` call deletes the idle leftovers it sees: a caller
that polls ``stats`` while draining (as the rollout does) sees them go.

Latency. haproxy keeps no histogram, but it logs every request: the frontend logs
``<server> <Tc> <Tr>`` (connect and response-header times, in ms) to a unix datagram
socket served by ``python -m graven.router.haproxy.collector``, a tiny process that
sums the times into ``LATENCY_BOUNDS`` buckets per server and answers a query
socket. It exits by itself when its haproxy is gone and starts afresh with it, so
its counters reset exactly when haproxy's do. Resolution is haproxy's: 1 ms. Log
datagrams are dropped, not queued, if the collector falls behind, so under extreme
load the histogram may count slightly fewer requests than ``requests``.

Files, per service, under ``STATE/haproxy/SERVICE/``::

    haproxy.cfg    generated; rewritten on every change
    backends.json  the desired set (and the leftovers still draining)
    router.json    {"pid", "start_time", "port", "collector_pid", "collector_start_time"}
    haproxy.log    haproxy's and the collector's stderr: start-up, alerts, never requests
    lock           serialises every call between threads and controller processes
    admin.sock, log.sock, latency.sock
                   the runtime API, the log socket and the collector's query socket
                   (under a private directory in /tmp when the path would not fit a
                   unix socket address)
"""
