"""``graven logs`` over runc instances: the runc runtime writes the same instance log
files as the process runtime, and the controller marks them the same way."""

from __future__ import annotations

import pytest

from tests.e2e.test_logs import lines
from tests.e2e.test_runc_runtime import RuncProject, runc_project

pytestmark = [pytest.mark.e2e, pytest.mark.needs_root("runc containers need root")]
__all__ = ["runc_project"]  # the fixture, used by name


def test_logs_of_runc_instances(runc_project: RuncProject) -> None:
    project = runc_project.project
    project.graven("deploy", "-m", "sealed")
    ids = {i["id"] for i in project.status()["instances"]}
    every = lines(project, "hello")
    assert {ln["instance"] for ln in every} == ids
    for instance in ids:
        own = [ln["line"] for ln in every if ln["instance"] == instance]
        assert any(line.startswith("SEAL-PROBE ") for line in own), own
        assert any("version v1 serving on" in line for line in own), own
    assert [ln["time"] for ln in every] == sorted(ln["time"] for ln in every)
    assert len(lines(project, "hello", "--tail", "2")) == 2
