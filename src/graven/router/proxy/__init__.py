"""The embedded router: one small HTTP/1.1 reverse-proxy process per service.

Run as::

    python -m graven.router.proxy --service web --listen 127.0.0.1:8080 \\
        --admin STATE/routers/web.sock --state STATE/routers/web.json

Data plane
    Each client request goes to one backend in state ``ready``, chosen by smooth
    weighted round-robin, over a keep-alive backend connection: an idle one from the
    backend's pool when there is one, else a fresh one. ``drain`` backends get no new
    requests (their in-flight requests finish) and their idle connections are closed
    at once, so an instance about to stop sees no new request on an old connection.

Connection pool
    Per backend, at most ``POOL_SIZE`` idle connections, most recently used first; one
    idle for ``POOL_IDLE_TIMEOUT`` (shorter than common backend keep-alive timeouts) is
    closed. A connection goes back to the pool only when its exchange ended cleanly:
    the whole request sent, a length-delimited or chunked response read to its end,
    nothing more in the buffer, no ``Connection: close``, an HTTP/1.1 (or explicitly
    keep-alive) backend, and the backend still ``ready``. Anything arriving on an idle
    connection (data or a close) discards it. Requests whose body is streamed
    (chunked, or longer than ``REPLAY_LIMIT``) always get a fresh connection.

When a request is sent again (``resend_decision``)
    Never once any byte of the response arrived, never when the body was streamed
    (it is gone), and never after a response timeout. Otherwise:

    - on a *reused* connection, a clean close (EOF) or a reset / broken pipe before the
      answer started is the keep-alive race: the backend closed the idle connection as
      the request was on its way, so it never read it. The request goes once more, on
      a fresh connection to the same backend, whatever the method (its body is
      buffered); idempotent methods are also resent after any other socket error. This
      is HAProxy's ``retry-on conn-failure empty-response``; it counts no error.
    - on a *fresh* connection, a reset before the answer means the backend closed its
      listening socket with our connection still queued (the application never saw
      it), so any method goes to another ready backend; a clean close is ambiguous and
      only an idempotent request goes to another backend. Both count an error and put
      the backend on a short cooldown, as does a refused connection.

Metrics (cumulative since the proxy started)
    Per backend: ``requests`` (times it was chosen), ``errors`` (5xx answers plus
    attempts that got no usable answer), ``responses_5xx``, and ``latency_buckets``:
    responses per ``LATENCY_BOUNDS`` bucket (upper bounds, inclusive) plus an overflow
    bucket, timed from the moment the whole request was handed to the backend's socket
    to the moment the final response head arrived (the backend's think time, not the
    client's download time). Their sum is the number of responses the backend gave.

Admin API (HTTP/1.1 + JSON on the unix socket ``--admin``)
    ``GET /health``    -> ``{"ok": true, "pid": .., "service": .., "port": .., "loop": ..}``
                          (``loop``: ``uvloop`` or ``asyncio``, the event loop serving)
    ``GET /backends``  -> ``{"service", "port", "backends": [{id, address, state,
    weight, inflight, requests, errors, responses_5xx, latency_buckets,
    idle_connections}]}``
    ``PUT /backends``  with ``{"backends": [{id, address, state, weight}]}`` replaces
    the set atomically, after persisting it to ``--state``.

The process started is a supervisor that holds the port and the admin socket and runs
``--workers N`` proxy processes (one by default); see ``graven.router.workers``.

Exit codes: 0 after SIGTERM (in-flight requests finish, at most 10 s), 2 bad
arguments, 3 cannot bind the port or the admin socket, 4 unreadable state file.
Nothing is written per request; errors go to stderr.

The hot path runs in protocol callbacks: no task, timer or future per request. A
coroutine takes over only to connect or to stream a body too big to buffer; one
periodic sweep enforces the timeouts and expires idle pooled connections.

Modules (at run time each needs only those above it; ``__main__`` runs ``entry.main``)
    ``http1``      HTTP/1.1 heads: the fast and strict parsers, the proxy's error answers
    ``channel``    one TCP connection: a buffer that callbacks and coroutines share
    ``backends``   backend sets: wire and state-file forms, the live table, pools, balancer
    ``exchange``   a client connection's requests: body copying, the resend rule, the trip
    ``server``     a worker's data plane: sessions, the sweep, shutdown
    ``admin``      the admin API: routing, and its one-request-per-connection server
    ``entry``      arguments and the event loop; hands over to ``graven.router.workers``
"""
