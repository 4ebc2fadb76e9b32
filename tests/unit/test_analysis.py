"""Rollout analysis: statistics against reference values, thresholds, verdicts.

Reference values were computed once with SciPy 1.17 (``mannwhitneyu`` with
``method="asymptotic"``, ``use_continuity=True``, ``alternative="greater"`` on the
histograms expanded to one observation per request; ``fisher_exact`` with
``alternative="greater"``; ``norm.sf``) and are hard-coded: SciPy is not a dependency.
"""

from __future__ import annotations

import json
import math

import pytest

from graven.errors import UsageError
from graven.rollout.analysis import (
    BUCKETS,
    REASON_BASELINE_TOO_SMALL,
    REASON_ERROR_RATE_EXCEEDED,
    REASON_LATENCY_UNDECIDED,
    REASON_MORE_ERRORS,
    REASON_NO_LATENCY_DATA,
    REASON_NOT_ENOUGH_REQUESTS,
    REASON_P99_EXCEEDED,
    REASON_PASSED,
    REASON_SLOWER,
    AnalysisThresholds,
    ReleaseTraffic,
    analyze,
    compare_error_rates,
    fisher_greater,
    judge,
    mann_whitney,
    p99_seconds,
    quantile_bucket,
    traffic_by_release,
    two_proportion_greater,
)
from graven.router.base import LATENCY_BOUNDS, BackendStats

# Latency histograms over LATENCY_BOUNDS (1ms ... 5s, then overflow).
BASE = (0, 5, 40, 120, 200, 90, 30, 10, 4, 1, 0, 0, 0)  # 500 requests, mostly 5-20ms
SLOW = (0, 1, 10, 40, 120, 160, 100, 40, 20, 6, 2, 1, 0)  # 500, shifted one bucket up
SAME = (0, 2, 8, 25, 40, 18, 6, 1, 0, 0, 0, 0, 0)  # 100, shaped like BASE

# --- Mann-Whitney U ---------------------------------------------------------------------------


def test_mann_whitney_by_hand() -> None:
    # Canary latencies {1, 2, 2}, baseline {0, 0, 1} (bucket indexes).
    # U counts pairs where the canary is slower, ties half: 1 beats 0, 0 and ties 1
    # (2.5); each 2 beats all three (3 + 3): U = 8.5 of 9 pairs.
    # Tied groups of 2, 2, 2: variance = 3*3/12 * (7 - 3*(8-2)/(6*5)) = 0.75 * 6.4 = 4.8.
    test = mann_whitney([0, 1, 2], [2, 1, 0])
    assert test.u == 8.5
    assert test.sd == pytest.approx(math.sqrt(4.8))
    assert test.z == pytest.approx((8.5 - 4.5 - 0.5) / math.sqrt(4.8))
    assert test.effect == pytest.approx(8.5 / 9)
    assert test.p_slower == pytest.approx(0.055074462092973495, rel=1e-12)  # SciPy


def test_mann_whitney_matches_scipy_on_real_histograms() -> None:
    slow = mann_whitney(SLOW, BASE)
    assert slow.u == 182889.5
    assert slow.p_slower == pytest.approx(3.630685358834572e-39, rel=1e-9)
    same = mann_whitney(SAME, BASE)
    assert same.u == 24120.0
    assert same.p_slower == pytest.approx(0.7195759537935975, rel=1e-12)
    # Non-inferiority at a margin of 0.1: H0 "slower in at least 60% of pairs".
    assert same.p_within(0.1) == pytest.approx(5.14838902305732e-05, rel=1e-9)
    fast = mann_whitney(BASE, SLOW)
    assert fast.u == 67110.5
    assert fast.p_slower == pytest.approx(1.0)


def test_mann_whitney_with_every_request_in_one_bucket() -> None:
    test = mann_whitney([0, 7, 0], [0, 30, 0])
    assert test.sd == 0 and test.effect == 0.5
    assert test.p_slower == 1.0 and test.p_within(0.1) == 0.0


def test_mann_whitney_needs_both_sides() -> None:
    with pytest.raises(ValueError, match="both sides"):
        mann_whitney([0, 0], [1, 2])


# --- error rates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "n1", "b", "n2", "scipy"),
    [
        (3, 50, 1, 5000, 3.629170001201948e-06),
        (0, 200, 0, 20000, 1.0),
        (1, 200, 0, 20000, 0.009900990099009901),
        (6, 200, 10, 2000, 0.0019283768731900414),
        (24, 200, 3, 1800, 6.102565490868988e-22),
    ],
)
def test_fisher_exact_matches_scipy(a: int, n1: int, b: int, n2: int, scipy: float) -> None:
    assert fisher_greater(a, n1, b, n2) == pytest.approx(scipy, rel=1e-9)


def test_two_proportion_z_by_hand() -> None:
    # 30/1000 against 20/2000: pooled 50/3000, z = 0.02 / sqrt(p(1-p)(1/1000 + 1/2000)).
    assert two_proportion_greater(30, 1000, 20, 2000) == pytest.approx(
        2.7446173572658597e-05, rel=1e-9
    )
    assert two_proportion_greater(0, 100, 0, 100) == 1.0


def test_small_counts_use_fisher_large_ones_the_z_test() -> None:
    assert compare_error_rates(1, 200, 0, 20000).method == "fisher"
    assert compare_error_rates(30, 1000, 20, 2000).method == "z"
    with pytest.raises(ValueError, match="requests on both sides"):
        compare_error_rates(0, 0, 1, 10)


# --- p99 ------------------------------------------------------------------------------------


def hist(**at: int) -> tuple[int, ...]:
    """A histogram with counts at named bounds: hist(ms10=98, s1=2, over=1)."""
    names = {f"ms{b * 1000:g}" if b < 1 else f"s{b:g}": n for n, b in enumerate(LATENCY_BOUNDS)}
    names["over"] = len(LATENCY_BOUNDS)
    counts = [0] * BUCKETS
    for name, count in at.items():
        counts[names[name]] = count
    return tuple(counts)


def test_p99_is_the_upper_bound_of_its_bucket() -> None:
    assert p99_seconds(hist(ms10=98, ms500=2)) == 0.5  # rank 99 of 100 falls in (200ms, 500ms]
    assert p99_seconds(hist(ms10=99, ms500=1)) == 0.01
    assert p99_seconds(hist(ms10=50, over=50)) == math.inf
    assert p99_seconds(hist()) is None
    assert p99_seconds(hist(ms1=1)) == 0.001
    assert quantile_bucket(hist(ms1=50, ms2=50), 0.5) == 0
    assert quantile_bucket(hist(ms1=50, ms2=51), 0.5) == 1


# --- windows ------------------------------------------------------------------------------


def stats(
    bid: str, requests: int, errors: int = 0, buckets: tuple[int, ...] = (), fives: int = 0
) -> BackendStats:
    return BackendStats(
        bid, "127.0.0.1:1", "ready", 0, requests, errors, 100, fives, buckets or hist()
    )


def test_window_sums_each_release_and_survives_resets() -> None:
    start = [
        stats("a", 100, 1, hist(ms10=100)),
        stats("b", 50, 0, hist(ms10=50)),
        stats("c", 500, 5, hist(ms10=500)),  # restarts during the window
        stats("gone", 10),
    ]
    end = [
        stats("a", 160, 3, hist(ms10=150, ms20=10), fives=2),
        stats("b", 90, 1, hist(ms10=90)),
        stats("c", 20, 1, hist(ms10=20)),
        stats("late", 7, 0, hist(ms5=7)),  # joined during the window
        stats("stranger", 99),
    ]
    releases = {"a": 1, "b": 1, "c": 2, "late": 2, "gone": 1}
    traffic = traffic_by_release(start, end, releases)
    assert traffic[1] == ReleaseTraffic(1, 100, 3, 2, hist(ms10=90, ms20=10))
    assert traffic[2] == ReleaseTraffic(2, 27, 1, 0, hist(ms5=7, ms10=20))


def test_a_router_without_histograms_counts_as_no_latency_data() -> None:
    plain = BackendStats("a", "127.0.0.1:1", "ready", 0, 80, 0)
    traffic = traffic_by_release([], [plain], {"a": 1})
    assert traffic[1].timed == 0 and traffic[1].requests == 80


# --- verdicts -----------------------------------------------------------------------------


def release(number: int, buckets: tuple[int, ...], errors: int = 0) -> ReleaseTraffic:
    return ReleaseTraffic(number, sum(buckets), errors, errors, buckets)


LIMITS = AnalysisThresholds(max_error_rate=0.01, max_p99_seconds=0.5, min_requests=50)


def test_not_enough_requests_is_inconclusive() -> None:
    verdict = analyze(release(2, hist(ms10=12)), release(1, BASE), LIMITS)
    assert verdict.outcome == "inconclusive"
    assert verdict.reasons == ("not enough requests to canary r2: 12 of 50 needed",)
    assert verdict.codes == (REASON_NOT_ENOUGH_REQUESTS,)


def test_error_rate_above_the_limit_fails() -> None:
    verdict = analyze(release(2, hist(ms10=200), errors=24), None, LIMITS)
    assert verdict.outcome == "fail"
    assert verdict.codes == (REASON_ERROR_RATE_EXCEEDED,)
    assert verdict.reasons[0].startswith("canary r2 error rate 12.0% (24/200) exceeds 1.0%")
    assert verdict.metrics.canary.error_rate == 0.12


def test_p99_above_the_limit_fails() -> None:
    verdict = analyze(release(2, hist(ms10=90, s2=10)), None, LIMITS)
    assert verdict.outcome == "fail"
    assert verdict.codes == (REASON_P99_EXCEEDED,)
    assert verdict.reasons == ("canary r2 p99 latency (between 1s and 2s) exceeds 500ms",)
    assert verdict.metrics.canary.p99_seconds == 2.0
    overflow = analyze(release(2, hist(ms10=90, over=10)), None, LIMITS)
    assert "(above 5s)" in overflow.reasons[0]
    assert overflow.metrics.canary.p99_seconds is None
    assert overflow.metrics.canary.p99_overflow is True


def test_a_canary_like_its_baseline_passes() -> None:
    verdict = analyze(release(2, SAME), release(1, BASE), LIMITS)
    assert verdict.outcome == "pass"
    assert verdict.codes == (REASON_PASSED,)
    summary = verdict.reasons[0]
    assert summary.startswith("canary r2 passed: error rate 0.0% (0/100) within 1.0%")
    assert "p99 latency between 50ms and 100ms within 500ms" in summary
    assert "latency no worse than baseline r1 (slower in " in summary
    test = verdict.metrics.latency_test
    assert test.u == 24120.0 and test.p_within_margin == pytest.approx(5.148389e-05)


def test_a_slower_canary_fails_even_within_the_p99_limit() -> None:
    verdict = analyze(release(2, SLOW), release(1, BASE), AnalysisThresholds(max_p99_seconds=2.0))
    assert verdict.outcome == "fail"
    assert verdict.codes == (REASON_SLOWER,)
    assert verdict.reasons[0].startswith(
        "canary r2 is slower than baseline r1: slower in 73.2% of request pairs, at least 60.0%"
    )


def test_too_little_traffic_to_compare_latency_is_inconclusive() -> None:
    canary = release(2, hist(ms5=20, ms10=25, ms20=15))
    baseline = release(1, hist(ms5=25, ms10=25, ms20=10))
    verdict = analyze(canary, baseline, LIMITS)
    assert verdict.outcome == "inconclusive"
    assert verdict.codes == (REASON_LATENCY_UNDECIDED,)
    assert "more traffic would decide" in verdict.reasons[0]


def test_more_errors_than_the_baseline_fails_below_the_absolute_limit() -> None:
    limits = AnalysisThresholds(max_error_rate=0.05, max_p99_seconds=None)
    canary = ReleaseTraffic(2, 200, 6, 6, hist(ms10=200))
    baseline = ReleaseTraffic(1, 2000, 10, 10, hist(ms10=2000))
    verdict = analyze(canary, baseline, limits)
    assert verdict.outcome == "fail"
    assert verdict.codes == (REASON_MORE_ERRORS,)
    assert verdict.reasons[0] == (
        "canary r2 error rate 3.0% (6/200) is above baseline r1's 0.50% (10/2000) "
        "by more than 0.50% (Fisher's exact test, p=0.0019 < 0.05)"
    )
    assert verdict.metrics.error_test.method == "fisher"
    assert verdict.metrics.error_test.p_value == pytest.approx(0.0019283768731900414)


def test_one_stray_error_against_a_clean_baseline_passes() -> None:
    canary = ReleaseTraffic(2, 200, 1, 1, hist(ms10=200))
    baseline = ReleaseTraffic(1, 20000, 0, 0, hist(ms10=20000))
    verdict = analyze(canary, baseline, LIMITS)
    assert verdict.metrics.error_test.p_value < 0.05  # significant, but only 0.5 points
    assert verdict.outcome == "pass"


def test_a_small_baseline_skips_the_comparison_and_says_so() -> None:
    verdict = analyze(release(2, SAME), release(1, hist(ms10=12)), LIMITS)
    assert verdict.outcome == "pass"
    assert verdict.codes == (REASON_PASSED, REASON_BASELINE_TOO_SMALL)
    assert verdict.reasons[1] == "comparison with baseline r1 skipped: 12 of 50 requests needed"


def test_no_latency_histogram_is_inconclusive_where_latency_is_judged() -> None:
    verdict = analyze(ReleaseTraffic(2, 100), None, LIMITS)
    assert verdict.outcome == "inconclusive"
    assert verdict.codes == (REASON_NO_LATENCY_DATA,)
    assert verdict.reasons == ("no latency histogram for canary r2: its p99 cannot be checked",)
    both = analyze(ReleaseTraffic(2, 100), ReleaseTraffic(1, 100), LIMITS)
    assert both.codes == (REASON_NO_LATENCY_DATA,)  # said once
    no_limit = AnalysisThresholds(max_p99_seconds=None)
    assert analyze(ReleaseTraffic(2, 100), None, no_limit).outcome == "pass"
    compared = analyze(release(2, SAME), ReleaseTraffic(1, 100), no_limit)
    assert compared.reasons == ("no latency histogram for baseline r1: latency cannot be compared",)


def test_failures_and_undecided_checks_all_show() -> None:
    canary = release(2, hist(ms5=20, ms10=25, s2=15), errors=30)
    baseline = release(1, hist(ms5=25, ms10=25, ms20=10))
    verdict = analyze(canary, baseline, LIMITS)
    assert verdict.outcome == "fail"
    assert REASON_ERROR_RATE_EXCEEDED in verdict.codes and REASON_P99_EXCEEDED in verdict.codes
    sent = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))  # the API can send it
    metrics = sent["metrics"]
    assert list(metrics) == ["canary", "baseline", "latency_test", "error_test", "thresholds"]
    assert list(metrics["latency_test"]) == [
        "method",
        "u",
        "n_canary",
        "n_baseline",
        "z",
        "p_slower",
        "p_within_margin",
        "effect",
    ]
    assert metrics["error_test"]["method"] in ("fisher", "z")
    assert metrics["canary"]["latency_buckets"] == list(canary.latency_buckets)
    assert metrics["canary"]["timed_requests"] == canary.timed


def test_judge_reads_two_router_readings() -> None:
    start = [stats("s1", 1000, 0, hist(ms10=1000)), stats("c1", 0)]
    end = [
        stats(
            "s1",
            1000 + sum(BASE),
            0,
            tuple(a + b for a, b in zip(hist(ms10=1000), BASE, strict=True)),
        ),
        stats("c1", sum(SAME), 0, SAME),
    ]
    verdict = judge(
        start, end, {"s1": 1, "c1": 2}, canary_release=2, baseline_release=1, thresholds=LIMITS
    )
    assert verdict.outcome == "pass"
    assert verdict.metrics.baseline.requests == 500
    nothing = judge([], [], {}, canary_release=2, baseline_release=None, thresholds=LIMITS)
    assert nothing.outcome == "inconclusive"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_error_rate", 2.0, "max_error_rate must be 0-1"),
        ("min_requests", 0, "min_requests must be at least 1"),
        ("alpha", 1.0, "alpha must be between 0 and 1"),
        ("latency_margin", 0.5, "latency_margin must be between 0 and 0.5"),
        ("max_p99_seconds", 0.0, "max_p99_seconds must be above 0"),
    ],
)
def test_thresholds_are_validated(field: str, value: float, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        AnalysisThresholds(**{field: value})  # type: ignore[arg-type]
