"""What every verb needs: where the spec is, where state lives, who is acting.

click is only a type here: the lean paths in ``graven.cli.entry`` use this module too.
"""

from __future__ import annotations

import os
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from graven.errors import InternalError, UsageError

if TYPE_CHECKING:
    import click

    from graven.controller.client import ControllerClient
    from graven.ledger.state import StateStore
    from graven.spec.loader import LoadedSpec
    from graven.store.cas import ContentStore


class AppContext:
    """The root command's options, and what they lead to (spec, state dir, clients).

    A plain class, not a dataclass: the lean rollback path uses it too, and importing
    ``dataclasses`` (and with it ``inspect``) is a large share of a lean start-up."""

    def __init__(
        self,
        spec_file: Path | None = None,
        state_dir_option: Path | None = None,
        debug: bool = False,
    ) -> None:
        self.spec_file = spec_file
        self.state_dir_option = state_dir_option
        self.debug = debug
        self._loaded: LoadedSpec | None = None

    def __repr__(self) -> str:
        return (
            f"AppContext(spec_file={self.spec_file!r}, "
            f"state_dir_option={self.state_dir_option!r}, debug={self.debug!r})"
        )

    def spec(self) -> LoadedSpec:
        """The validated spec; raises SpecError with every problem found."""
        if self._loaded is None:
            from graven.spec import find_spec, load_spec

            self._loaded = load_spec(find_spec(Path.cwd(), self.spec_file))
        return self._loaded

    def spec_path(self) -> Path:
        """Where the spec is, without reading it."""
        if self._loaded is not None:
            return self._loaded.path
        from graven.spec.locate import find_spec

        return find_spec(Path.cwd(), self.spec_file)

    def _spec_path_if_any(self) -> Path | None:
        from graven.spec.locate import find_spec

        try:
            return find_spec(Path.cwd(), self.spec_file)
        except UsageError:
            if self.spec_file is not None:
                raise
            return None

    @cached_property
    def state_dir(self) -> Path:
        """--state-dir, else $GRAVEN_STATE_DIR, else .graven beside graven.yaml."""
        from graven.controller.paths import state_dir_for

        found = self.state_dir_option is not None or os.environ.get("GRAVEN_STATE_DIR")
        state_dir = state_dir_for(
            self.state_dir_option, None if found else self._spec_path_if_any()
        )
        if state_dir is None:
            raise UsageError(
                "no graven.yaml here or in any parent directory, and no state dir given",
                hint="Run inside a graven project, or pass --state-dir / set GRAVEN_STATE_DIR.",
            )
        return state_dir

    def store(self) -> ContentStore:
        from graven.controller.paths import make_private, store_root
        from graven.store.cas import ContentStore

        for change in make_private(self.state_dir):
            sys.stderr.write(f"graven: tightened permissions of {change}\n")
        return ContentStore(store_root(self.state_dir))

    def state(self) -> StateStore:
        from graven.controller.paths import require_access, state_db
        from graven.ledger.state import open_state_store

        require_access(self.state_dir, state_db(self.state_dir))
        return open_state_store(state_db(self.state_dir), read_only=True)

    def controller(self) -> ControllerClient:
        """A client of this state dir's controller, started if none runs: for the
        verbs that change state."""
        from graven.controller.client import ControllerClient
        from graven.controller.paths import require_access

        require_access(self.state_dir)
        client = ControllerClient(self.state_dir)
        client.ensure_running()
        return client

    def running_controller(self) -> ControllerClient | None:
        """A client of the controller if one runs, else None: the verbs that only look
        never start one."""
        from graven.controller.client import ControllerClient
        from graven.controller.paths import require_access

        require_access(self.state_dir)
        client = ControllerClient(self.state_dir)
        return client if client.alive() else None


def app_context(ctx: click.Context) -> AppContext:
    """The AppContext the root command stored, from any subcommand's click context."""
    obj = ctx.find_root().obj
    if not isinstance(obj, AppContext):
        raise InternalError("graven's root command did not set up its context")
    return obj


def actor() -> str:
    """Who is acting: $GRAVEN_ACTOR, else user@host."""
    explicit = os.environ.get("GRAVEN_ACTOR")
    if explicit:
        return explicit
    import getpass
    import socket  # only the verbs that record a change ask; a no-op build does not

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def source_commit(directory: Path) -> str | None:
    """The git commit the spec's directory is at, with '+dirty' when it has changes."""
    import subprocess  # only deploys ask

    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if dirty.stdout.strip() else "")
