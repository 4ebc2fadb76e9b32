"""The machine report on made-up machines: every missing part has a plain sentence and
a fix; ``graven check`` warns about settings the machine cannot honour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from graven.cli.lines import plain
from graven.cli.render_runtime import machine_report
from graven.runtime.cgroups import CgroupLayout, Hierarchy
from graven.runtime.limits import LimitSupport
from graven.runtime.machine import MachineFacts, probe_machine, report_of, spec_warnings
from graven.spec import load_spec
from graven.testing.specs import hello_spec, render

V1 = CgroupLayout(
    tuple(Hierarchy(c, Path(f"/sys/fs/cgroup/{c}"), 1) for c in ("memory", "pids", "cpu"))
)
ALL_LIMITS = tuple(LimitSupport(c, True) for c in ("memory", "pids", "cpu"))  # type: ignore[arg-type]

FULL = MachineFacts(
    root=True,
    bwrap="/usr/bin/bwrap",
    sealing="sealed",
    sealed=True,
    sealing_probed=True,
    runc="/usr/sbin/runc",
    runc_version="runc version 1.1.5",
    runc_init="/usr/bin/tini-static",
    max_user_namespaces=1000,
    overlayfs=True,
    cgroups=V1,
    limits=ALL_LIMITS,
)


def text(facts: MachineFacts) -> str:
    return "\n".join(plain(line) for line in machine_report(report_of(facts)))


def test_a_machine_with_everything() -> None:
    report = report_of(FULL)
    assert all(f.available for f in (*report.runtimes, *report.features))
    assert report.cgroups == "v1"
    assert "everything graven can use is here" in text(FULL)
    assert json.loads(json.dumps(report.to_dict()))["runtimes"][1] == {
        "name": "runc",
        "available": True,
        "detail": "runc version 1.1.5 (/usr/sbin/runc); choose it with GRAVEN_RUNTIME=runc",
    }


def test_a_bare_unprivileged_machine_says_what_to_install_and_do() -> None:
    bare = MachineFacts(
        root=False,
        sealing="none (user namespaces cannot be created by this user)",
        sealing_probed=True,
        max_user_namespaces=0,
        cgroups=CgroupLayout(
            missing=(("memory", "no memory cgroup is mounted (neither v1 nor v2)"),)
        ),
        limits=(LimitSupport("memory", False, "no memory cgroup is mounted (neither v1 nor v2)"),),
    )
    report = report_of(bare)
    shown = text(bare)
    runc = report.feature("runc")
    assert runc is not None and not runc.available
    assert runc.fix == "apt-get install runc (and run graven as root)"
    bwrap = report.feature("bubblewrap")
    assert bwrap is not None and bwrap.fix == "apt-get install bubblewrap"
    userns = report.feature("user namespaces")
    assert userns is not None and "turned off" in userns.detail
    assert "sysctl -w user.max_user_namespaces=" in userns.fix
    memory = report.feature("memory limit")
    assert memory is not None and not memory.available
    assert "resources.memory is not enforced: no memory cgroup is mounted" in memory.detail
    overlay = report.feature("overlayfs")
    assert overlay is not None and overlay.fix == "modprobe overlay (as root)"
    assert "fix: apt-get install bubblewrap" in shown
    assert shown.splitlines()[-1].startswith("missing: runc, sealed instances, user namespaces")


def test_runc_that_does_not_run_or_lacks_root() -> None:
    broken = report_of(
        MachineFacts(root=True, runc="/usr/sbin/runc", runc_error="exec format error")
    )
    runc = broken.feature("runc")
    assert runc is not None and runc.detail == "/usr/sbin/runc does not run: exec format error"
    unprivileged = report_of(
        MachineFacts(root=False, runc="/usr/sbin/runc", runc_version="runc version 1.1.5")
    )
    runc = unprivileged.feature("runc")
    assert runc is not None and not runc.available and runc.fix == "run graven as root"
    no_init = report_of(MachineFacts(root=True, runc="/usr/sbin/runc", runc_version="runc 1.1"))
    runc = no_init.feature("runc")
    assert runc is not None and not runc.available and runc.fix == "apt-get install tini"


def test_this_machine_can_be_probed() -> None:
    facts = probe_machine()
    report = report_of(facts)
    assert {f.name for f in report.runtimes} == {"process", "runc"}
    assert len(facts.limits) == 3


def loaded_spec(tmp_path: Path, **service: object) -> object:
    doc = yaml.safe_load(hello_spec(port=8000, version="v1"))
    doc.pop("version")
    doc["services"]["hello"].update(service)
    path = tmp_path / "graven.yaml"
    path.write_text(render(doc))
    (tmp_path / "app").mkdir()
    return load_spec(path)


def test_check_warns_about_limits_the_machine_cannot_enforce(tmp_path: Path) -> None:
    loaded = loaded_spec(tmp_path, resources={"memory": "64Mi", "cpu": 0.5}, isolation="required")
    facts = MachineFacts(
        root=False,
        sealing="none (bubblewrap (bwrap) not found on PATH; install it)",
        limits=(
            LimitSupport("memory", False, "/sys/fs/cgroup/memory is not writable by uid 1000"),
            LimitSupport("pids", False, "no pids cgroup"),
            LimitSupport("cpu", True),
        ),
    )
    warnings = spec_warnings(loaded, facts)  # type: ignore[arg-type]
    assert [w.key_path for w in warnings] == ["services.hello.resources.memory"]
    assert warnings[0].line is not None
    assert "cannot be enforced on this machine (/sys/fs/cgroup/memory is not writable" in str(
        warnings[0]
    )
    assert spec_warnings(loaded, FULL) == []  # type: ignore[arg-type]


def test_status_warns_about_limits_this_machine_cannot_enforce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graven.cli import render
    from graven.model import MIB, Resources
    from graven.runtime import limits
    from tests.unit.test_cli_render_views import service

    machine = (
        LimitSupport("memory", False, "no memory cgroup is mounted"),
        LimitSupport("pids", True),
    )
    monkeypatch.setattr(limits, "machine_support", lambda: machine)
    assert limits.limit_warnings(Resources()) == ()
    assert limits.limit_warnings(Resources(pids=8)) == ()
    said = limits.limit_warnings(Resources(memory=64 * MIB, pids=8))
    assert said == (
        "resources.memory is not enforced on this machine: no memory cgroup is mounted",
    )
    shown = [plain(line) for line in render.service_status(service(warnings=said), 0.0)]
    assert f"  warning: {said[0]}" in shown
