"""Plan steps: stable kinds, readable descriptions, slots bound to instances."""

from __future__ import annotations

import json
from typing import get_args

from graven.controller.results import PlanView, to_json
from graven.plan.steps import (
    Analyze,
    AwaitHealthy,
    Drain,
    KeepWarm,
    Pause,
    Plan,
    RecordProgress,
    RoutePreview,
    RouteTraffic,
    SetWeights,
    StartInstance,
    Step,
    StopInstance,
    SwitchTraffic,
    bind_slots,
)


def test_every_step_kind_is_distinct() -> None:
    kinds = [cls.kind for cls in get_args(Step)]
    assert len(kinds) == len(set(kinds)) == 12
    assert {
        SetWeights.kind,
        Pause.kind,
        Analyze.kind,
        SwitchTraffic.kind,
        KeepWarm.kind,
        RoutePreview.kind,
        RecordProgress.kind,
    } == {
        "set-weights",
        "pause",
        "analyze",
        "switch",
        "keep-warm",
        "route-preview",
        "record-progress",
    }


def test_descriptions_read_as_sentences() -> None:
    assert Pause(30, "canary step 1 of 2 at 10%").describe("web") == (
        "pause 30s (canary step 1 of 2 at 10%)"
    )
    assert Pause(None, "awaiting promote").describe("web") == (
        "pause until 'graven promote web' (awaiting promote)"
    )
    assert Analyze(60, 6, 7).describe("web") == "analyze web@r7 against web@r6 for 60s"
    assert SwitchTraffic(7).describe("web") == (
        "switch all live traffic to web@r7 (others stay warm, idle)"
    )
    assert KeepWarm(6, 90).describe("web").startswith("keep web@r6 warm for 90s")
    assert RoutePreview("new-1").describe("web") == "expose new-1 on the preview route"
    assert RecordProgress(2, 3).describe("web") == "record canary step 2 of 3 as done"
    assert SetWeights((("a", 30), ("b", 10))).describe("web") == "set router weights a=30, b=10"
    assert SetWeights((("a", 30), ("b", 10)), ((6, 75), (7, 25))).describe("web") == (
        "shift live traffic to web@r6 75%, web@r7 25% (weights a=30, b=10)"
    )
    assert SetWeights((("new-1", 0),)).describe("web") == (
        "hold new-1 at weight 0 (no live traffic yet)"
    )


def test_bind_slots_names_the_instances_started() -> None:
    slots = {"new-1": "web-r7-3f2a"}
    assert bind_slots(AwaitHealthy("new-1"), slots) == AwaitHealthy("web-r7-3f2a")
    assert bind_slots(RoutePreview("new-1"), slots) == RoutePreview("web-r7-3f2a")
    assert bind_slots(Drain("web-r6-0000"), slots) == Drain("web-r6-0000")
    assert bind_slots(SetWeights((("new-1", 0), ("new-2", 0))), slots) == SetWeights(
        (("web-r7-3f2a", 0), ("new-2", 0))
    )
    assert bind_slots(StartInstance("new-1", 7), slots) == StartInstance("new-1", 7)
    assert bind_slots(KeepWarm(6, 60), slots) == KeepWarm(6, 60)


def test_plans_with_new_steps_serialize() -> None:
    plan = Plan(
        "web",
        7,
        (
            StartInstance("new-1", 7),
            SetWeights((("new-1", 0),)),
            RouteTraffic("new-1"),
            SwitchTraffic(7),
            KeepWarm(6, 600),
            StopInstance("web-r6-0000"),
        ),
    )
    data = json.loads(json.dumps(to_json(PlanView.of(plan))))
    assert [s["kind"] for s in data["steps"]] == [
        "start",
        "set-weights",
        "route",
        "switch",
        "keep-warm",
        "stop",
    ]
