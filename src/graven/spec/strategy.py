"""The ``strategy`` of a service in ``graven.yaml``: how a rollout replaces instances
(rolling, blue-green or canary), its canary steps and analysis gates.

The spec keeps one flat mapping for every type (the file format users write);
``StrategySpec.to_config`` hands the planners the typed config of the one type chosen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from graven.model import (
    AnalysisConfig,
    BlueGreenConfig,
    CanaryConfig,
    CanaryStep,
    RollingConfig,
    StrategyConfig,
)
from graven.spec.fields import MANUAL, Duration, Pause, ShortDuration, StrictModel


class CanaryStepSpec(StrictModel):
    """One canary step: shift ``weight`` percent of live traffic, then wait and judge."""

    weight: int = Field(ge=1, le=100, description="Percent of live traffic to the canary.")
    pause: Pause = Field(
        default=0.0,
        description="How long to hold this step, or 'manual' to wait for 'graven promote'.",
    )
    analysis: bool = Field(
        default=True,
        description="Judge the canary against the stable release before going on.",
    )


# More requests than one analysis window of a busy service could see.
MAX_REQUESTS = 1_000_000


class AnalysisSpec(StrictModel):
    """When a canary passes, fails (abort and roll back) or is inconclusive (pause)."""

    window: Duration = Field(default=30.0, gt=0, description="Traffic watched per analysis.")
    max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="Largest canary 5xx/failure rate (0.01 = 1%)."
    )
    max_p99: ShortDuration | None = Field(
        default=1.0, description="Largest canary p99 latency; null for no limit."
    )
    min_requests: int = Field(
        default=50, ge=1, le=MAX_REQUESTS, description="Canary requests needed before any verdict."
    )


class StrategySpec(StrictModel):
    """How a rollout replaces instances."""

    type: Literal["rolling", "blue-green", "canary"] = Field(
        default="rolling",
        description="rolling: replace a few at a time; blue-green: a full new set beside the "
        "old, one traffic switch, old kept warm for the rollback window; canary: traffic "
        "shifted in steps, each judged by analysis.",
    )
    max_surge: int = Field(
        default=1, ge=0, le=100, description="Instances allowed above 'replicas' during a rollout."
    )
    max_unavailable: int = Field(
        default=0, ge=0, le=100, description="Instances allowed below 'replicas' during a rollout."
    )
    preview_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="blue-green: port of the preview route to the new set before the switch.",
    )
    auto_promote: bool = Field(
        default=True,
        description="blue-green: switch once healthy (and, with a preview, analyzed); false "
        "waits for 'graven promote'.",
    )
    rollback_window: Duration = Field(
        default=300.0,
        ge=0,
        description="blue-green/canary: how long the previous release stays warm; a rollback "
        "inside it is only a traffic switch.",
    )
    steps: list[CanaryStepSpec] = Field(
        default_factory=list, description="canary: the traffic steps, in order."
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    @model_validator(mode="after")
    def _consistent(self) -> StrategySpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: nothing could move")
        if self.type == "canary" and not self.steps:
            raise ValueError("a canary strategy needs 'steps', e.g. [{weight: 10}, {weight: 50}]")
        if self.type != "canary" and self.steps:
            raise ValueError(f"'steps' are for type canary (this strategy is {self.type!r})")
        if self.type != "blue-green" and self.preview_port is not None:
            raise ValueError("'preview_port' is for type blue-green")
        weights = [s.weight for s in self.steps]
        if weights != sorted(weights):
            raise ValueError(f"canary step weights must not decrease, got {weights}")
        return self

    def to_config(self) -> StrategyConfig:
        """The config of this strategy's type: the settings it uses (the others the spec
        accepts for every type are left out)."""
        a = self.analysis
        analysis = AnalysisConfig(
            window=a.window,
            max_error_rate=a.max_error_rate,
            max_p99=a.max_p99,
            min_requests=a.min_requests,
        )
        if self.type == "blue-green":
            return BlueGreenConfig(
                preview_port=self.preview_port,
                auto_promote=self.auto_promote,
                rollback_window=self.rollback_window,
                analysis=analysis,
            )
        if self.type == "canary":
            return CanaryConfig(
                steps=tuple(
                    CanaryStep(s.weight, None if s.pause == MANUAL else float(s.pause), s.analysis)
                    for s in self.steps
                ),
                analysis=analysis,
            )
        return RollingConfig(max_surge=self.max_surge, max_unavailable=self.max_unavailable)
