"""The retry rules, pure: delays, REST classification, reconnect policy (no I/O, no clock)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.backoff import (
    HEALTHY_AFTER_S,
    Decision,
    Reconnects,
    classify,
    classify_connect,
    decide,
    delays,
    parse_retry_after,
)


def top(lo: float, hi: float) -> float:
    return hi


def bottom(lo: float, hi: float) -> float:
    return lo


def first(n: int, it: Iterator[float]) -> list[float]:
    return list(itertools.islice(it, n))


# ---- the delay generator ------------------------------------------------------------------------


def test_rest_delays_double_from_0_2_s_up_to_5_s() -> None:
    assert first(8, delays(uniform=top)) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5])
    assert first(3, delays(uniform=bottom)) == pytest.approx([0.1, 0.2, 0.4])


def test_reconnect_delays_double_from_0_5_s_up_to_30_s() -> None:
    policy = Reconnects(uniform=top)
    got = [policy.next_delay(0.0) for _ in range(9)]
    assert got == pytest.approx([0.5, 1, 2, 4, 8, 16, 30, 30, 30])


def test_the_jitter_draws_between_half_and_all_of_each_step() -> None:
    seen: list[tuple[float, float]] = []

    def record(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return (lo + hi) / 2

    first(3, delays(1.0, 3.0, uniform=record))
    assert seen == [(0.5, 1.0), (1.0, 2.0), (1.5, 3.0)]


def test_negative_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        delays(-1.0, 5.0)
    with pytest.raises(ValueError):
        delays(0.1, -5.0)


@given(
    base=st.floats(min_value=0, max_value=100, allow_nan=False),
    cap=st.floats(min_value=0, max_value=100, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
    n=st.integers(min_value=1, max_value=60),
)
def test_delays_never_exceed_the_cap_and_never_go_negative(
    base: float, cap: float, seed: int, n: int
) -> None:
    rng = random.Random(seed)
    for delay in first(n, delays(base, cap, uniform=rng.uniform)):
        assert 0.0 <= delay <= cap


@given(
    cap=st.floats(min_value=0, max_value=100, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
    attempts=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=1000, allow_nan=False),
            st.sampled_from(["retry", "reauth", "slow"]),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_reconnect_delays_stay_within_the_cap(
    cap: float, seed: int, attempts: list[tuple[float, str]]
) -> None:
    policy = Reconnects(cap=cap, uniform=random.Random(seed).uniform)
    for up_for_s, verdict in attempts:
        assert 0.0 <= policy.next_delay(up_for_s, verdict) <= cap  # type: ignore[arg-type]


# ---- reconnects ---------------------------------------------------------------------------------


def test_a_healthy_connection_starts_the_backoff_over() -> None:
    policy = Reconnects(uniform=top)
    assert [policy.next_delay(1.0) for _ in range(4)] == [0.5, 1, 2, 4]
    assert policy.next_delay(HEALTHY_AFTER_S) == 8  # exactly the healthy period: not yet
    assert policy.next_delay(HEALTHY_AFTER_S + 0.5) == 0.5  # ready for longer: from the start
    assert policy.next_delay(0.0) == 1


def test_a_refusal_waits_at_least_5_s_within_the_cap() -> None:
    assert Reconnects(uniform=top).next_delay(0.0, "slow") == 5.0
    assert Reconnects(uniform=top).next_delay(0.0, "reauth") == 0.5  # logged in again: at once
    assert Reconnects(cap=2.0, uniform=top).next_delay(0.0, "slow") == 2.0
    late = Reconnects(uniform=top)
    for _ in range(6):
        late.next_delay(0.0)
    assert late.next_delay(0.0, "slow") == 30.0  # the backoff is past the floor already


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (None, "retry"),  # network error, dropped connection
        (400, "retry"),
        (404, "retry"),
        (401, "reauth"),
        (403, "slow"),
        (429, "slow"),
        (500, "slow"),
        (503, "slow"),
    ],
)
def test_connect_failures(status: int | None, verdict: str) -> None:
    assert classify_connect(status) == verdict


# ---- REST requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "idempotent", "reached", "relogged", "verdict"),
    [
        (401, True, True, False, "reauth"),
        (401, False, True, False, "reauth"),  # refused before anything happened
        (401, True, True, True, "fatal"),  # logged in once already
        (429, True, True, False, "rate_limited"),
        (429, False, True, False, "rate_limited"),  # refused at the gate: even a /say goes again
        (500, True, True, False, "retry"),
        (503, True, True, False, "retry"),
        (500, False, True, False, "fatal"),  # a /say the server may have spoken: never again
        (0, True, True, False, "retry"),  # no answer
        (0, False, True, False, "fatal"),  # no answer, but it may have been sent
        (0, False, False, False, "retry"),  # never connected: it cannot have reached the server
        (400, True, True, False, "fatal"),
        (403, True, True, False, "fatal"),
        (404, True, True, False, "fatal"),
        (409, False, True, False, "fatal"),
    ],
)
def test_classify_rest_failures(
    status: int, idempotent: bool, reached: bool, relogged: bool, verdict: str
) -> None:
    got = classify(status, idempotent=idempotent, reached=reached, relogged=relogged)
    assert got == verdict


def test_a_retry_waits_the_next_delay_but_not_past_the_deadline() -> None:
    waits = iter([0.3, 4.0])
    assert decide("retry", remaining_s=10, retry_after=None, backoff=waits) == Decision(
        "retry", wait_s=0.3
    )
    assert decide("retry", remaining_s=1.5, retry_after=None, backoff=waits) == Decision(
        "retry", wait_s=1.5
    )


def test_past_the_deadline_a_retry_gives_up_without_drawing_a_delay() -> None:
    waits = iter([0.3])
    assert decide("retry", remaining_s=0.0, retry_after=2.0, backoff=waits).verdict == "fatal"
    assert decide("retry", remaining_s=-1.0, retry_after=None, backoff=waits).verdict == "fatal"
    assert next(waits) == 0.3


def test_a_429_waits_for_retry_after_and_holds_the_budget_even_when_giving_up() -> None:
    waits = iter([0.7])
    assert decide("rate_limited", remaining_s=10, retry_after=2.0, backoff=waits) == Decision(
        "rate_limited", wait_s=2.0, hold_s=2.0
    )
    given_up = decide("rate_limited", remaining_s=2.0, retry_after=2.0, backoff=waits)
    assert (given_up.verdict, given_up.hold_s) == ("fatal", 2.0)
    zero = decide("rate_limited", remaining_s=1.0, retry_after=0.0, backoff=waits)
    assert zero == Decision("rate_limited", wait_s=0.0, hold_s=0.0)  # still holds the budget
    # without Retry-After: the backoff's next delay
    assert decide("rate_limited", remaining_s=10, retry_after=None, backoff=waits) == Decision(
        "rate_limited", wait_s=0.7, hold_s=0.7
    )


def test_final_verdicts_pass_through() -> None:
    waits = iter([1.0])
    for verdict in ("fatal", "reauth"):
        step = decide(verdict, remaining_s=10, retry_after=1.0, backoff=waits)
        assert step == Decision(verdict)
    assert next(waits) == 1.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ("nan", None),
        ("inf", None),
        ("2", 2.0),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("600", 60.0),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds
