"""The call's small machines, each on its own: table steps, and any input order stays legal.

Each property test throws every input at a machine in any order. A step either follows its table
row or raises `Illegal` and leaves the machine exactly as it was; and each machine keeps its own
promise (phases never go back, a confirmed stop stays confirmed, turns only count up).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.call.ledger import STOP_TABLE, Ledger, StopInput, StopState
from agentd.call.phase import PHASE_TABLE, REMOTE, Effect, Phase, PhaseInput, PhaseMachine
from agentd.call.session import SESSION_TABLE, SessionInput, SessionMachine, SessionState
from agentd.call.table import Illegal
from agentd.call.turn import TURN_TABLE, TurnInput, TurnMachine, TurnState

ORDER = list(Phase)  # the phases in the order a call goes through them


# ---- the call phase -------------------------------------------------------------------------


def test_a_call_goes_through_its_phases_in_order() -> None:
    m = PhaseMachine()
    steps = ["dialing", "ringing", "progressing", "greeted", "hangup", "clean"]
    effects = [m.step(PhaseInput(s)) for s in steps]
    assert effects == [
        Effect.NOTE,
        Effect.NOTE,
        Effect.ANSWER,
        Effect.GREET,
        Effect.END,
        Effect.FINISH,
    ]
    assert m.phase is Phase.ENDED


def test_a_stale_status_is_a_quiet_no_op_and_an_internal_slip_raises() -> None:
    m = PhaseMachine(Phase.ACTIVE)
    assert m.step(PhaseInput.RINGING) is None  # a ringing after progressing: stale
    assert m.phase is Phase.ACTIVE
    with pytest.raises(Illegal):
        m.step(PhaseInput.CLEAN)  # "nothing left to clean" while the call is live: a bug
    assert m.phase is Phase.ACTIVE


@given(st.lists(st.sampled_from(list(PhaseInput)), max_size=30))
def test_phases_never_go_back_whatever_the_inputs(inputs: list[PhaseInput]) -> None:
    m = PhaseMachine()
    for inp in inputs:
        before = m.phase
        try:
            effect = m.step(inp)
        except Illegal:
            assert inp not in REMOTE and m.phase is before
            continue
        if effect is None:
            assert inp in REMOTE and m.phase is before
        else:
            assert PHASE_TABLE[(before, inp)] == (m.phase, effect)
        assert ORDER.index(m.phase) >= ORDER.index(before)


# ---- a session --------------------------------------------------------------------------------


def test_a_speaking_is_created_polled_cut_and_restarted() -> None:
    m = SessionMachine("speaking")
    m.step(SessionInput.START)
    assert m.next_poll(0.0, 0.2, 2.0) == 0.2  # the create said initiating: first poll
    m.step(SessionInput.INITIATING, "s1")
    assert m.next_poll(0.2, 0.2, 2.0) == 0.4  # still initiating: wait twice as long
    assert m.poll_started == 0.0
    m.step(SessionInput.ACTIVE, "s1")
    assert m.active and m.id == "s1"
    m.step(SessionInput.CUT)
    m.step(SessionInput.STOPPED)
    m.step(SessionInput.START)
    assert m.state is SessionState.STARTING and m.id is None


def test_a_result_for_a_session_that_is_not_starting_raises() -> None:
    m = SessionMachine("transcribe")
    with pytest.raises(Illegal):
        m.step(SessionInput.ACTIVE, "t1")
    assert m.state is SessionState.NONE and m.id is None


@given(
    st.lists(
        st.tuples(st.sampled_from(list(SessionInput)), st.sampled_from([None, "a", "b"])),
        max_size=40,
    )
)
def test_a_session_stays_legal_whatever_the_inputs(
    inputs: list[tuple[SessionInput, str | None]],
) -> None:
    m = SessionMachine("speaking")
    for inp, sid in inputs:
        before = (m.state, m.id, m.attempts)
        try:
            m.step(inp, sid)
        except Illegal:
            assert (m.state, m.id, m.attempts) == before
            continue
        assert SESSION_TABLE[(before[0], inp)] is m.state
        if m.state is SessionState.STARTING and inp is SessionInput.START:
            assert m.id is None  # nothing may be said to the old session any more
        if inp is SessionInput.ACTIVE:
            assert m.attempts == 0


# ---- the cleanup ledger ---------------------------------------------------------------------


def test_a_failed_stop_stays_pending_until_confirmed() -> None:
    ledger = Ledger()
    assert ledger.stop("s1", "speaking")
    assert not ledger.stop("s1", "speaking")  # already asked: no second stop
    ledger.step("s1", StopInput.FAILED)
    assert ledger.attempts("s1") == 2 and not ledger.clean
    ledger.step("s1", StopInput.OK)
    assert ledger.state("s1") is StopState.CONFIRMED and ledger.clean
    with pytest.raises(Illegal):
        ledger.step("nobody", StopInput.OK)  # a stop confirmed that was never sent: a bug


def test_an_awaited_end_keeps_the_call_unclean_until_it_comes_or_a_stop_replaces_it() -> None:
    ledger = Ledger()
    assert ledger.expect("t1", "transcribe")
    assert not ledger.expect("t1", "transcribe")  # armed once
    assert ledger.state("t1") is StopState.AWAITING and not ledger.clean
    assert ("transcribe", "t1") in ledger.unconfirmed() and "t1" in ledger.known()
    assert ledger.attempts("t1") == 0  # no stop sent
    with pytest.raises(Illegal):
        ledger.step("t1", StopInput.OK)  # an answer to a stop that was never sent: a bug
    ledger.step("t1", StopInput.ENDED)
    assert ledger.state("t1") is StopState.CONFIRMED and ledger.clean
    # the end did not come: the late stop takes over, as an ordinary pending stop
    assert ledger.expect("t2", "transcribe")
    assert ledger.stop("t2", "speaking")  # the kind awaited is kept
    assert ledger.kind_of("t2") == "transcribe" and ledger.attempts("t2") == 1
    assert not ledger.expect("t2", "transcribe")  # a stop under way is not undone


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(StopInput))),
        max_size=40,
    )
)
def test_a_confirmed_stop_stays_confirmed_and_clean_means_nothing_pending(
    inputs: list[tuple[str, StopInput]],
) -> None:
    ledger = Ledger()
    confirmed: set[str] = set()
    for sid, inp in inputs:
        before = ledger.state(sid)
        try:
            after = ledger.step(sid, inp)
        except Illegal:
            assert ledger.state(sid) is before
            continue
        assert STOP_TABLE[(before, inp)] is after
        if after is StopState.CONFIRMED:
            confirmed.add(sid)
        assert all(ledger.state(s) is StopState.CONFIRMED for s in confirmed)
        assert ledger.clean == (not ledger.pending and not ledger.awaiting)


# ---- the turn -------------------------------------------------------------------------------


def test_a_turn_thinks_speaks_and_listens_again() -> None:
    m = TurnMachine()
    m.step(TurnInput.TRANSCRIPT)
    assert m.state is TurnState.THINKING and m.turn == 1 and m.current(1)
    m.step(TurnInput.SENTENCE)
    m.step(TurnInput.DONE)
    assert m.state is TurnState.LISTENING and not m.current(1)
    with pytest.raises(Illegal):
        m.step(TurnInput.SENTENCE)  # a sentence with no reply under way


@given(st.lists(st.sampled_from(list(TurnInput)), max_size=40))
def test_turns_only_count_up_one_per_transcript(inputs: list[TurnInput]) -> None:
    m = TurnMachine()
    for inp in inputs:
        before = (m.state, m.turn)
        try:
            m.step(inp)
        except Illegal:
            assert (m.state, m.turn) == before
            continue
        assert TURN_TABLE[(before[0], inp)] is m.state
        assert m.turn == before[1] + (inp is TurnInput.TRANSCRIPT)
    assert m.turn == inputs.count(TurnInput.TRANSCRIPT)


def test_an_answered_transcript_is_remembered_and_the_memory_is_bounded() -> None:
    m = TurnMachine()
    assert m.mark_seen("tr1") and not m.mark_seen("tr1")
    for i in range(3000):
        m.mark_seen(f"x{i}")
    assert not m.seen("tr1") and m.seen("x2999")
