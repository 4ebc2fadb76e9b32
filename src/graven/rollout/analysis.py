"""Automated rollout analysis, pure: two readings of the router's counters in, a verdict out.

The controller reads ``Router.stats`` when an ``Analyze`` step starts and again when its
window ends; ``judge`` (or ``traffic_by_release`` then ``analyze``) turns the two
readings into a ``Verdict`` for the canary release against the baseline release.

Checks, each with a stable reason code (like Argo Rollouts' reason constants):

- enough traffic: fewer than ``min_requests`` canary requests is ``inconclusive``
  (``NotEnoughRequests``) and nothing else is judged;
- error rate: errors (5xx answers and requests that got no answer) over requests,
  above ``max_error_rate`` fails (``ErrorRateExceeded``);
- p99 latency: the upper bound of the histogram bucket holding the 99th percentile,
  above ``max_p99_seconds`` fails (``LatencyP99Exceeded``). Thresholds set on bucket
  bounds (``LATENCY_BOUNDS``) are therefore exact. Latency that must be judged
  without a histogram (a router that keeps none) is ``inconclusive`` (``NoLatencyData``);
- against the baseline, when one is given and it has ``min_requests`` too (else a
  ``BaselineTooSmall`` note, and the thresholds alone decide):

  * errors: a one-sided test that the canary's error rate is higher (Fisher's exact
    test when any expected cell count is below 5, Cochran's rule; else the pooled
    two-proportion z-test). It fails (``CanaryMoreErrorsThanBaseline``) when
    significant at ``alpha`` *and* higher by more than ``error_rate_margin``, so one
    stray error against a spotless baseline does not fail a rollout. Error rates get
    no "inconclusive": the absolute threshold already bounds them.
  * latency: the Mann-Whitney U test on the binned latencies (each request is an
    observation valued by its bucket; ties, which binning makes common, get midranks;
    normal approximation with tie correction and continuity correction). Its effect
    size ``U / (n_canary * n_baseline)`` is the probability that a canary request is
    slower than a baseline one, ties counting half (Vargha and Delaney's A). It fails
    (``CanarySlowerThanBaseline``) when "canary slower" is significant at ``alpha``
    and A is at least ``0.5 + latency_margin``; it passes when a non-inferiority test
    shows A below ``0.5 + latency_margin`` at ``alpha``; otherwise the data cannot
    decide (``LatencyComparisonInconclusive``).

Outcome: ``fail`` if any check fails, else ``inconclusive`` if any cannot decide, else
``pass``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

from graven.errors import InternalError, UsageError
from graven.router.base import LATENCY_BOUNDS, BackendStats

Outcome = Literal["pass", "fail", "inconclusive"]

REASON_PASSED = "AnalysisPassed"
REASON_NOT_ENOUGH_REQUESTS = "NotEnoughRequests"
REASON_ERROR_RATE_EXCEEDED = "ErrorRateExceeded"
REASON_P99_EXCEEDED = "LatencyP99Exceeded"
REASON_NO_LATENCY_DATA = "NoLatencyData"
REASON_MORE_ERRORS = "CanaryMoreErrorsThanBaseline"
REASON_SLOWER = "CanarySlowerThanBaseline"
REASON_LATENCY_UNDECIDED = "LatencyComparisonInconclusive"
REASON_BASELINE_TOO_SMALL = "BaselineTooSmall"

BUCKETS = len(LATENCY_BOUNDS) + 1  # the last one counts everything slower than the last bound


@dataclass(frozen=True)
class AnalysisThresholds:
    """What a canary must meet. Rates are fractions (0.01 is 1%)."""

    max_error_rate: float = 0.01
    max_p99_seconds: float | None = 1.0  # None: no latency limit
    min_requests: int = 50
    alpha: float = 0.05
    # Largest tolerated P(canary request slower than a baseline one) above one half.
    latency_margin: float = 0.1
    # Largest tolerated excess of the canary's error rate over the baseline's.
    error_rate_margin: float = 0.005

    def __post_init__(self) -> None:
        for name in ("max_error_rate", "error_rate_margin"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UsageError(f"analysis {name} must be 0-1 (got {value})")
        if self.max_p99_seconds is not None and not self.max_p99_seconds > 0:
            raise UsageError(
                f"analysis max_p99_seconds must be above 0 (got {self.max_p99_seconds})"
            )
        if self.min_requests < 1:
            raise UsageError(f"analysis min_requests must be at least 1 (got {self.min_requests})")
        if not 0 < self.alpha < 1:
            raise UsageError(f"analysis alpha must be between 0 and 1 (got {self.alpha})")
        if not 0 < self.latency_margin < 0.5:
            raise UsageError(
                f"analysis latency_margin must be between 0 and 0.5 (got {self.latency_margin})"
            )


@dataclass(frozen=True)
class ReleaseTraffic:
    """What one release's routed instances served during an analysis window."""

    release: int
    requests: int = 0
    errors: int = 0
    responses_5xx: int = 0
    latency_buckets: tuple[int, ...] = (0,) * BUCKETS

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def timed(self) -> int:
        """Requests the latency histogram counted (completed ones)."""
        return sum(self.latency_buckets)


def _buckets(stats: BackendStats) -> tuple[int, ...]:
    if not stats.latency_buckets:
        return (0,) * BUCKETS  # a router that keeps no histogram
    if len(stats.latency_buckets) != BUCKETS:
        raise InternalError(
            f"backend {stats.id}: {len(stats.latency_buckets)} latency buckets, "
            f"expected {BUCKETS} (LATENCY_BOUNDS plus overflow)"
        )
    return stats.latency_buckets


def _window(before: BackendStats | None, after: BackendStats) -> tuple[int, int, int, list[int]]:
    late = [after.requests, after.errors, after.responses_5xx, *_buckets(after)]
    if before is None:
        return late[0], late[1], late[2], late[3:]  # joined during the window, from zero
    early = [before.requests, before.errors, before.responses_5xx, *_buckets(before)]
    delta = [b - a for a, b in zip(early, late, strict=True)]
    if any(d < 0 for d in delta):
        delta = late  # the router restarted: its counters began again from zero
    return delta[0], delta[1], delta[2], delta[3:]


def traffic_by_release(
    start: Iterable[BackendStats], end: Iterable[BackendStats], releases: Mapping[str, int]
) -> dict[int, ReleaseTraffic]:
    """Sum each release's traffic over the window between two ``Router.stats`` readings.

    ``releases`` maps instance id to release; backends it does not name are ignored.
    A backend gone by ``end`` is not counted (its last requests are lost to the window).
    """
    before = {s.id: s for s in start}
    totals: dict[int, list[int]] = {}
    for stats in end:
        release = releases.get(stats.id)
        if release is None:
            continue
        requests, errors, fives, buckets = _window(before.get(stats.id), stats)
        acc = totals.setdefault(release, [0] * (3 + BUCKETS))
        for n, value in enumerate([requests, errors, fives, *buckets]):
            acc[n] += value
    return {
        r: ReleaseTraffic(r, acc[0], acc[1], acc[2], tuple(acc[3:])) for r, acc in totals.items()
    }


# --- latency --------------------------------------------------------------------------------


def quantile_bucket(buckets: Sequence[int], q: float) -> int | None:
    """Index of the bucket that holds the ``q`` quantile, None without observations."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return index
    raise InternalError("quantile rank beyond the histogram total")


def p99_seconds(buckets: Sequence[int]) -> float | None:
    """The p99 latency as the upper bound of its bucket: ``inf`` when it is slower than
    the last bound, None without observations."""
    index = quantile_bucket(buckets, 0.99)
    return None if index is None else bucket_bound(index)


def bucket_bound(index: int) -> float:
    """Upper bound (seconds) of histogram bucket ``index``; ``inf`` for the overflow."""
    return LATENCY_BOUNDS[index] if index < len(LATENCY_BOUNDS) else math.inf


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class MannWhitney:
    """The Mann-Whitney U test of canary latencies against baseline latencies."""

    u: float  # pairs (canary, baseline) where the canary request is slower, ties half
    n_canary: int
    n_baseline: int
    sd: float  # of U under the null hypothesis, tie-corrected

    @property
    def effect(self) -> float:
        """P(a canary request is slower than a baseline one), ties counting half."""
        return self.u / (self.n_canary * self.n_baseline)

    @property
    def z(self) -> float:
        """Standard score of U for "canary slower", continuity-corrected."""
        if self.sd == 0:
            return 0.0
        return (self.u - self.n_canary * self.n_baseline / 2 - 0.5) / self.sd

    @property
    def p_slower(self) -> float:
        """One-sided p-value of "the canary is slower" (H0: no difference)."""
        return _normal_sf(self.z) if self.sd else 1.0

    def p_within(self, margin: float) -> float:
        """One-sided p-value of "the canary is slower in fewer than ``0.5 + margin`` of
        pairs" (H0: at least that many), the non-inferiority test."""
        bound = self.n_canary * self.n_baseline * (0.5 + margin)
        if self.sd == 0:
            return 0.0 if self.u < bound else 1.0
        return _normal_sf((bound - self.u - 0.5) / self.sd)


def mann_whitney(canary: Sequence[int], baseline: Sequence[int]) -> MannWhitney:
    """Mann-Whitney U over two latency histograms with the same buckets.

    Each bucket is one tied group: its requests share the bucket's midrank.
    """
    if len(canary) != len(baseline):
        raise InternalError("latency histograms with different buckets")
    n1, n2 = sum(canary), sum(baseline)
    if n1 == 0 or n2 == 0:
        raise ValueError("the Mann-Whitney test needs observations on both sides")
    n = n1 + n2
    u = 0.0
    below = 0  # baseline requests in faster buckets
    ties = 0  # sum of t^3 - t over tied groups
    for a, b in zip(canary, baseline, strict=True):
        u += a * (below + b / 2)
        below += b
        t = a + b
        ties += t**3 - t
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    return MannWhitney(u, n1, n2, math.sqrt(max(variance, 0.0)))


# --- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorComparison:
    """A one-sided test that the canary's error rate is higher than the baseline's."""

    method: Literal["fisher", "z"]
    p_value: float


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(a: int, n1: int, b: int, n2: int) -> float:
    """Fisher's exact test, one-sided: P(X >= a) for the canary's error count X given
    both totals (hypergeometric), with ``a`` of ``n1`` and ``b`` of ``n2`` failing."""
    total, failed = n1 + n2, a + b
    base = _log_comb(total, n1)
    terms = [
        _log_comb(failed, x) + _log_comb(total - failed, n1 - x) - base
        for x in range(a, min(failed, n1) + 1)
    ]
    if not terms:
        return 0.0
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def two_proportion_greater(a: int, n1: int, b: int, n2: int) -> float:
    """Pooled two-proportion z-test, one-sided: canary rate ``a/n1`` above ``b/n2``."""
    pooled = (a + b) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0  # no errors, or nothing but errors, on both sides: no difference
    return _normal_sf((a / n1 - b / n2) / se)


def compare_error_rates(a: int, n1: int, b: int, n2: int) -> ErrorComparison:
    """Canary ``a`` errors of ``n1`` requests against baseline ``b`` of ``n2``."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("comparing error rates needs requests on both sides")
    failed, total = a + b, n1 + n2
    expected = min(n * k / total for n in (n1, n2) for k in (failed, total - failed))
    if expected < 5:
        return ErrorComparison("fisher", fisher_greater(a, n1, b, n2))
    return ErrorComparison("z", two_proportion_greater(a, n1, b, n2))


# --- the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficMetrics:
    """One release's traffic in a window, as an analysis reports it."""

    release: int
    requests: int
    errors: int
    responses_5xx: int
    error_rate: float
    timed_requests: int
    # JSON has no infinity: a p99 beyond the last bound is reported as an overflow.
    p99_seconds: float | None
    p99_overflow: bool
    latency_buckets: tuple[int, ...]

    @classmethod
    def of(cls, traffic: ReleaseTraffic) -> TrafficMetrics:
        p99 = p99_seconds(traffic.latency_buckets)
        return cls(
            release=traffic.release,
            requests=traffic.requests,
            errors=traffic.errors,
            responses_5xx=traffic.responses_5xx,
            error_rate=traffic.error_rate,
            timed_requests=traffic.timed,
            p99_seconds=p99 if p99 is not None and math.isfinite(p99) else None,
            p99_overflow=p99 == math.inf,
            latency_buckets=traffic.latency_buckets,
        )


@dataclass(frozen=True)
class LatencyComparison:
    """The Mann-Whitney comparison of the canary's latency with the baseline's."""

    u: float
    n_canary: int
    n_baseline: int
    z: float
    p_slower: float
    p_within_margin: float
    effect: float
    method: str = "mann-whitney-u"


@dataclass(frozen=True)
class AnalysisMetrics:
    """The numbers behind a verdict; a test not run (too little traffic) is None."""

    canary: TrafficMetrics
    baseline: TrafficMetrics | None
    thresholds: AnalysisThresholds
    latency_test: LatencyComparison | None = None
    error_test: ErrorComparison | None = None

    def to_dict(self) -> dict[str, object]:
        latency = asdict(self.latency_test) if self.latency_test else None
        if latency is not None:  # the method first, as the API has always sent it
            latency = {"method": latency.pop("method"), **latency}
        return {
            "canary": _traffic_dict(self.canary),
            "baseline": _traffic_dict(self.baseline) if self.baseline else None,
            "latency_test": latency,
            "error_test": asdict(self.error_test) if self.error_test else None,
            "thresholds": asdict(self.thresholds),
        }


def _traffic_dict(metrics: TrafficMetrics) -> dict[str, object]:
    return {**asdict(metrics), "latency_buckets": list(metrics.latency_buckets)}


@dataclass(frozen=True)
class Verdict:
    """The outcome of an analysis. ``reasons`` are sentences for people; ``codes`` holds
    the stable reason code of each, in the same order, for scripts and the API."""

    outcome: Outcome
    reasons: tuple[str, ...]
    metrics: AnalysisMetrics | None = None
    codes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.reasons):
            raise InternalError("a verdict needs one reason code per reason")

    def to_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "reasons": [
                {"code": c, "message": m} for c, m in zip(self.codes, self.reasons, strict=True)
            ],
            "metrics": self.metrics.to_dict() if self.metrics else {},
        }


def _pct(fraction: float) -> str:
    value = fraction * 100
    return f"{value:.2f}%" if 0 < value < 1 else f"{value:.1f}%"


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _latency_range(index: int) -> str:
    if index == 0:
        return f"under {_secs(LATENCY_BOUNDS[0])}"
    if index >= len(LATENCY_BOUNDS):
        return f"above {_secs(LATENCY_BOUNDS[-1])}"
    return f"between {_secs(LATENCY_BOUNDS[index - 1])} and {_secs(LATENCY_BOUNDS[index])}"


class _Findings:
    def __init__(self) -> None:
        self.items: list[tuple[Outcome | None, str, str]] = []  # None: a note
        self.passed: list[str] = []  # what passed, for the summary

    def add(self, severity: Outcome | None, code: str, message: str) -> None:
        self.items.append((severity, code, message))

    def verdict(self, canary: int, metrics: AnalysisMetrics) -> Verdict:
        severities = {s for s, _, _ in self.items}
        outcome: Outcome = "pass"
        if "fail" in severities:
            outcome = "fail"
        elif "inconclusive" in severities:
            outcome = "inconclusive"
        items = [(c, m) for _, c, m in self.items]
        if outcome == "pass":
            summary = f"canary r{canary} passed: " + "; ".join(self.passed)
            items.insert(0, (REASON_PASSED, summary))
        codes, reasons = zip(*items, strict=True)
        return Verdict(outcome, tuple(reasons), metrics, tuple(codes))


def analyze(
    canary: ReleaseTraffic, baseline: ReleaseTraffic | None, thresholds: AnalysisThresholds
) -> Verdict:
    """Judge ``canary`` against ``thresholds`` and, when given, against ``baseline``."""
    t = thresholds
    found = _Findings()
    metrics = AnalysisMetrics(
        canary=TrafficMetrics.of(canary),
        baseline=TrafficMetrics.of(baseline) if baseline is not None else None,
        thresholds=t,
    )
    name = f"r{canary.release}"
    if canary.requests < t.min_requests:
        found.add(
            "inconclusive",
            REASON_NOT_ENOUGH_REQUESTS,
            f"not enough requests to canary {name}: {canary.requests} of {t.min_requests} needed",
        )
        return found.verdict(canary.release, metrics)

    rate = f"{_pct(canary.error_rate)} ({canary.errors}/{canary.requests})"
    if canary.error_rate > t.max_error_rate:
        found.add(
            "fail",
            REASON_ERROR_RATE_EXCEEDED,
            f"canary {name} error rate {rate} exceeds {_pct(t.max_error_rate)} "
            "(errors are 5xx answers and requests that got none)",
        )
    else:
        found.passed.append(f"error rate {rate} within {_pct(t.max_error_rate)}")

    index = quantile_bucket(canary.latency_buckets, 0.99)
    if t.max_p99_seconds is not None:
        if index is None:
            found.add(
                "inconclusive",
                REASON_NO_LATENCY_DATA,
                f"no latency histogram for canary {name}: its p99 cannot be checked",
            )
        elif bucket_bound(index) > t.max_p99_seconds:
            found.add(
                "fail",
                REASON_P99_EXCEEDED,
                f"canary {name} p99 latency ({_latency_range(index)}) "
                f"exceeds {_secs(t.max_p99_seconds)}",
            )
        else:
            found.passed.append(
                f"p99 latency {_latency_range(index)} within {_secs(t.max_p99_seconds)}"
            )

    if baseline is None:
        return found.verdict(canary.release, metrics)
    base = f"r{baseline.release}"
    if baseline.requests < t.min_requests:
        found.add(
            None,
            REASON_BASELINE_TOO_SMALL,
            f"comparison with baseline {base} skipped: "
            f"{baseline.requests} of {t.min_requests} requests needed",
        )
        return found.verdict(canary.release, metrics)

    metrics = replace(metrics, error_test=_compare_errors(found, canary, baseline, t))
    if canary.timed and baseline.timed:
        metrics = replace(metrics, latency_test=_compare_latency(found, canary, baseline, t))
    elif index is not None or t.max_p99_seconds is None:  # not reported above already
        missing = f"canary {name}" if index is None else f"baseline {base}"
        found.add(
            "inconclusive",
            REASON_NO_LATENCY_DATA,
            f"no latency histogram for {missing}: latency cannot be compared",
        )
    return found.verdict(canary.release, metrics)


def _compare_errors(
    found: _Findings, canary: ReleaseTraffic, baseline: ReleaseTraffic, t: AnalysisThresholds
) -> ErrorComparison:
    test = compare_error_rates(canary.errors, canary.requests, baseline.errors, baseline.requests)
    excess = canary.error_rate - baseline.error_rate
    method = "Fisher's exact test" if test.method == "fisher" else "two-proportion z-test"
    mine = f"{_pct(canary.error_rate)} ({canary.errors}/{canary.requests})"
    theirs = (
        f"baseline r{baseline.release}'s {_pct(baseline.error_rate)} "
        f"({baseline.errors}/{baseline.requests})"
    )
    if test.p_value < t.alpha and excess > t.error_rate_margin:
        found.add(
            "fail",
            REASON_MORE_ERRORS,
            f"canary r{canary.release} error rate {mine} is above {theirs} by more than "
            f"{_pct(t.error_rate_margin)} ({method}, p={test.p_value:.2g} < {t.alpha:g})",
        )
    else:
        found.passed.append(f"error rate not above {theirs}")
    return test


def _compare_latency(
    found: _Findings, canary: ReleaseTraffic, baseline: ReleaseTraffic, t: AnalysisThresholds
) -> LatencyComparison:
    test = mann_whitney(canary.latency_buckets, baseline.latency_buckets)
    limit = 0.5 + t.latency_margin
    p_within = test.p_within(t.latency_margin)
    comparison = LatencyComparison(
        u=test.u,
        n_canary=test.n_canary,
        n_baseline=test.n_baseline,
        z=test.z,
        p_slower=test.p_slower,
        p_within_margin=p_within,
        effect=test.effect,
    )
    share = f"slower in {_pct(test.effect)} of request pairs"
    against = f"baseline r{baseline.release}"
    if test.p_slower < t.alpha and test.effect >= limit:
        found.add(
            "fail",
            REASON_SLOWER,
            f"canary r{canary.release} is slower than {against}: {share}, at least "
            f"{_pct(limit)} (Mann-Whitney U={test.u:.10g}, p={test.p_slower:.2g} < {t.alpha:g})",
        )
    elif p_within < t.alpha:
        found.passed.append(
            f"latency no worse than {against} ({share}, under {_pct(limit)}; p={p_within:.2g})"
        )
    else:
        found.add(
            "inconclusive",
            REASON_LATENCY_UNDECIDED,
            f"latency against {against} undecided: canary {share}; neither above nor "
            f"below {_pct(limit)} at alpha {t.alpha:g} (p={test.p_slower:.2g} and "
            f"{p_within:.2g}); more traffic would decide",
        )
    return comparison


def judge(
    start: Iterable[BackendStats],
    end: Iterable[BackendStats],
    releases: Mapping[str, int],
    *,
    canary_release: int,
    baseline_release: int | None,
    thresholds: AnalysisThresholds,
) -> Verdict:
    """``traffic_by_release`` then ``analyze``: what the controller calls for an
    ``Analyze`` step, with the two ``Router.stats`` readings that bound its window."""
    traffic = traffic_by_release(start, end, releases)
    canary = traffic.get(canary_release, ReleaseTraffic(canary_release))
    baseline = None
    if baseline_release is not None:
        baseline = traffic.get(baseline_release, ReleaseTraffic(baseline_release))
    return analyze(canary, baseline, thresholds)
