"""The Runtime port's contract against each adapter: FakeRuntime, ProcessRuntime sealed
by bubblewrap and unsealed (real processes from a real image in a content store:
busybox, whose ``sh`` runs the instance script), and RuncRuntime (real runc containers
of a busybox image)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.model import Image, ImageConfig
from graven.runtime.base import Handle, LaunchSpec, Runtime
from graven.runtime.isolation import IsolationSupport
from graven.runtime.process import ProcessRuntime
from graven.runtime.runc import RuncRuntime, find_init
from graven.store.cas import ContentStore
from graven.store.tree_model import SYMLINK_MODE, Tree, TreeEntry
from graven.testing.busybox import busybox_image
from graven.testing.contracts.runtime import RuntimeContract, RuntimeHarness
from graven.testing.runtime import FakeRuntime
from tests import requires
from tests.requires import missing, need_tool

# The instance: sets itself up, says it runs, then waits (60 s at most) for its exit
# file and exits with the code written there. IGNORE_TERM makes SIGTERM do nothing
# (sleep inherits the ignored signal, so only SIGKILL ends it).
INSTANCE_SCRIPT = """\
[ -n "$IGNORE_TERM" ] && trap '' TERM
EXIT_FILE="$EXIT_DIR/exit"
echo "started $GRAVEN_INSTANCE"
i=0
while [ ! -s "$EXIT_FILE" ] && [ "$i" -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
exit "$(cat "$EXIT_FILE" 2>/dev/null || echo 9)"
"""


def make_image(store: ContentStore) -> Image:
    """An image of busybox alone: ``/bin/sh``, ``sleep`` and ``cat`` are its applets."""
    busybox = need_tool("busybox")
    root = store.put_tree(Tree.of([]))
    root = store.place(root, "/bin/busybox", store.ingest(Path(busybox)))
    for applet in ("sh", "sleep", "cat"):
        link = TreeEntry(applet, "symlink", SYMLINK_MODE, len("busybox"), target="busybox")
        root = store.place(root, f"/bin/{applet}", link)
    return store.put_image(root, ImageConfig(entrypoint=("sh", "-c", INSTANCE_SCRIPT)))


class FakeHarness:
    def __init__(self, tmp_path: Path) -> None:
        self.fake = FakeRuntime()
        self.runtime: Runtime = self.fake
        self.image = make_image(ContentStore(tmp_path / "store"))

    def spec(self, instance_id: str, *, ignores_sigterm: bool = False) -> LaunchSpec:
        if ignores_sigterm:
            self.fake.ignores_sigterm.add(instance_id)
        return LaunchSpec(instance_id, "web", 1, self.image, (), 1)

    def end(self, handle: Handle, code: int) -> None:
        self.fake.kill(handle.pid, f"exited with code {code}")

    def crash(self, handle: Handle) -> None:
        self.fake.kill(handle.pid, "killed by SIGKILL")

    def restarted(self) -> Runtime:
        return self.fake  # its records are all the state there is


class ProcessHarness:
    """``isolation``: None to seal as this machine can (which must be sealed, here)."""

    def __init__(self, tmp_path: Path, isolation: IsolationSupport | None = None) -> None:
        self.state_dir = tmp_path / "state"
        self.store = ContentStore(tmp_path / "store")
        self.isolation = isolation
        process = ProcessRuntime(self.state_dir, self.store, isolation)
        if isolation is None and not process.isolation.sealed:
            missing(f"instances cannot be sealed here: {process.isolation.reason}")
        self.runtime: Runtime = process
        self.image = make_image(self.store)
        self.exit_files = tmp_path / "exits"

    def spec(self, instance_id: str, *, ignores_sigterm: bool = False) -> LaunchSpec:
        # Sealed, an instance's /tmp is its own; unsealed, each gets a host directory.
        exit_dir = Path("/tmp")
        if self.isolation is not None:
            exit_dir = self.exit_files / instance_id
            exit_dir.mkdir(parents=True)
        env = [("EXIT_DIR", str(exit_dir))]
        if ignores_sigterm:
            env.append(("IGNORE_TERM", "1"))
        return LaunchSpec(instance_id, "web", 1, self.image, tuple(env), 1)

    def end(self, handle: Handle, code: int) -> None:
        # Written where the instance sees it: through its root, as the host sees that.
        environ = Path(f"/proc/{handle.pid}/environ").read_bytes().split(b"\0")
        exit_dir = next(e for e in environ if e.startswith(b"EXIT_DIR=")).decode()[9:]
        path = Path(f"/proc/{handle.pid}/root") / exit_dir.lstrip("/") / "exit"
        # As the instance's own uid: its /tmp belongs to its user namespace.
        uid = os.stat(f"/proc/{handle.pid}").st_uid
        as_user = {"user": uid, "group": uid, "extra_groups": []} if uid != os.getuid() else {}
        subprocess.run(
            ["/bin/sh", "-c", 'printf %s "$1" > "$0"', str(path), str(code)],
            check=True,
            **as_user,  # type: ignore[arg-type]
        )

    def crash(self, handle: Handle) -> None:
        os.killpg(handle.pid, signal.SIGKILL)

    def restarted(self) -> Runtime:
        return ProcessRuntime(self.state_dir, self.store, self.isolation)

    def close(self) -> None:
        """Stop what still runs, by the pid each instance recorded."""
        for instance_id, handle in self.runtime.orphans(set()):
            with contextlib.suppress(Exception):
                self.runtime.stop(handle, grace=0.0)
            assert not self.runtime.alive(handle), f"{instance_id} survived the test"


class TestFakeRuntime(RuntimeContract):
    @pytest.fixture
    def runtime_harness(self, tmp_path: Path) -> RuntimeHarness:
        return FakeHarness(tmp_path)


class TestProcessRuntime(RuntimeContract):
    """Sealed by bubblewrap, as on every machine CI runs on."""

    @pytest.fixture
    def runtime_harness(self, tmp_path: Path) -> Iterator[RuntimeHarness]:
        harness = ProcessHarness(tmp_path)
        try:
            yield harness
        finally:
            harness.close()


class TestUnsealedProcessRuntime(RuntimeContract):
    """Where a machine cannot seal: plain host processes from the checkout."""

    @pytest.fixture
    def runtime_harness(self, tmp_path: Path) -> Iterator[RuntimeHarness]:
        harness = ProcessHarness(
            tmp_path, IsolationSupport(False, reason="as on a machine without it")
        )
        try:
            yield harness
        finally:
            harness.close()


# ---------------------------------------------------------------------- runc

# The runc instance talks through its own /tmp (a tmpfs inside the container, which the
# harness reaches as /proc/PID/root/tmp from the host): it exits once /tmp/exit holds
# a code. The image is busybox alone, so the contract runs against a real sealed root.
RUNC_INSTANCE_SCRIPT = """\
[ -n "$IGNORE_TERM" ] && trap '' TERM
echo "started $GRAVEN_INSTANCE"
i=0
while [ ! -s /tmp/exit ] && [ "$i" -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
exit "$(cat /tmp/exit 2>/dev/null || echo 9)"
"""


class RuncHarness:
    def __init__(self, tmp_path: Path) -> None:
        requires.need_root("runc containers need root")
        requires.need_tool("runc")
        if find_init() is None:
            requires.missing("tini-static is not installed (scripts/setup installs it)")
        self.state_dir = tmp_path / "state"
        self.store = ContentStore(tmp_path / "store")
        self.runtime: Runtime = RuncRuntime(self.state_dir, self.store)
        self.image = busybox_image(
            self.store,
            tmp_path,
            ImageConfig(entrypoint=("sh", "-c", RUNC_INSTANCE_SCRIPT), env=(("PATH", "/bin"),)),
            busybox=requires.need_tool("busybox"),
        )

    def spec(self, instance_id: str, *, ignores_sigterm: bool = False) -> LaunchSpec:
        env = (("IGNORE_TERM", "1"),) if ignores_sigterm else ()
        return LaunchSpec(instance_id, "web", 1, self.image, env, 1)

    def end(self, handle: Handle, code: int) -> None:
        (Path(f"/proc/{handle.pid}/root/tmp") / "exit").write_text(str(code))

    def crash(self, handle: Handle) -> None:
        os.kill(handle.pid, signal.SIGKILL)

    def restarted(self) -> Runtime:
        return RuncRuntime(self.state_dir, self.store)

    def close(self) -> None:
        for instance_id, handle in self.runtime.orphans(set()):
            with contextlib.suppress(Exception):
                self.runtime.stop(handle, grace=0.0)
            assert not self.runtime.alive(handle), f"{instance_id} survived the test"
        # Instances that ended by themselves keep their container until forgotten, as
        # the controller does once it has read how they ended.
        for recorded in (self.state_dir / "instances").glob("*/handle"):
            pid, started = json.loads(recorded.read_text())
            self.runtime.forget(Handle(pid, started))
        leftover = sorted(p.name for p in (self.state_dir / "runc").glob("*"))
        assert leftover == [], f"runc still keeps containers {leftover}"


class TestRuncRuntime(RuntimeContract):
    @pytest.fixture
    def runtime_harness(self, tmp_path: Path) -> Iterator[RuncHarness]:
        harness = RuncHarness(tmp_path)
        try:
            yield harness
        finally:
            harness.close()
