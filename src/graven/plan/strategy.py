"""The planner of a release's strategy: one entry point over rolling, blue-green and
canary, chosen by the type of the release's strategy config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from graven.model import BlueGreenConfig, CanaryConfig, ServiceConfig
from graven.plan.blue_green import BlueGreenStatus, plan_blue_green
from graven.plan.canary import plan_canary
from graven.plan.rolling import ObservedInstance, plan_rolling
from graven.plan.steps import Plan


def plan_release(
    service: str,
    release: int,
    config: ServiceConfig,
    observed: Sequence[ObservedInstance],
    *,
    weights: Mapping[str, int],
    status: BlueGreenStatus | None = None,
    step_index: int = 0,
    now: float = 0.0,
) -> Plan:
    """Steps toward ``config.replicas`` instances of ``release`` by its strategy.

    ``status`` (blue-green) and ``step_index`` (canary) are what the controller
    persisted of the rollout so far; ``weights`` the router weight of each instance."""
    strategy = config.strategy
    if isinstance(strategy, BlueGreenConfig):
        return plan_blue_green(
            service,
            release,
            config.replicas,
            observed,
            strategy,
            weights=weights,
            status=status,
            now=now,
        )
    if isinstance(strategy, CanaryConfig):
        return plan_canary(
            service,
            release,
            config.replicas,
            observed,
            strategy,
            step_index=step_index,
            weights=weights,
        )
    return plan_rolling(service, release, config.replicas, list(observed), strategy)
