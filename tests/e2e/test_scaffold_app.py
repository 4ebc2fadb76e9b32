"""The example service ``graven init`` writes, run as a real process."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from graven.spec import scaffold

pytestmark = pytest.mark.e2e


def test_example_app_serves_keep_alive_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    scaffold(tmp_path)
    env = dict(os.environ, PORT="0", VERSION="v7", GRAVEN_INSTANCE="hello-r1-test")
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "app" / "app.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])  # printed once listening
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        bodies = []
        for path in ("/healthz", "/", "/missing"):
            conn.request("GET", path)
            reply = conn.getresponse()
            bodies.append((reply.status, reply.read()))
        assert bodies[0] == (200, b"ok\n")
        assert bodies[1][0] == 200
        assert b'"version": "v7"' in bodies[1][1]
        assert b'"instance": "hello-r1-test"' in bodies[1][1]
        assert bodies[2][0] == 404

        # The keep-alive connection stays open and idle; SIGTERM must not wait for it.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
