"""Replies asked for before the final transcript (`agent.reply_on = "interim"`).

On VoIPBIN the final transcript comes about a second after the caller stopped, with
`speech_ended` (docs/protocol.md §10); the interims come as the words are said. So the reply is
asked for on the interims: at once when the words end a question or a sentence, after a short
stable spell otherwise, never on a trailing "and" or "um" (`endpoint.cue`). Its sentences are
held until the turn is over — no new words for a while that depends on those cues and on this
caller's own pauses — and then said, usually before the final has come. When the caller goes on
the reply is dropped (a backend call wasted, at most `max_speculative` per turn) and asked again
for all of the words; a reply sent but not heard yet is cut before its audio starts.

One user turn gets one reply: the final that repeats the words already answered is absorbed,
whatever order, duplicates or read-backs it comes in; only new words open a new turn.

A restart can come between a turn's interims and its final. The history saved then ends with
the turn asked for on its interims; the restored call takes that turn for its open one and
sets the final, read back later, into it (`rejoin`): its words are not added twice, and words
it brings that the interims had not are kept.
"""

from __future__ import annotations

from agentd.call.core import NEVER
from agentd.call.endpoint import (
    Cue,
    Hearing,
    Pauses,
    covers,
    cue,
    extends,
    goes_on,
    rejoin,
    settles,
    words,
)
from agentd.call.settings import CallSettings
from agentd.call.talk import Conversation, is_backchannel
from agentd.call.turn import TurnInput
from agentd.commands import CancelBackend, Command, Record, StartTimer, StreamState
from agentd.events import SpeechEvent, TranscriptEvent
from agentd.names import Kind, Timer, TimerKind

_EPS = 0.01  # timers fire a hair early
_RESTORED_S = 30.0  # a restarted agentd reads the transcripts it missed back within this


class Listening(Conversation):
    """The conversation, with the end of the caller's turn read from their interims."""

    __slots__ = (
        "answered",
        "answered_until",
        "correcting",
        "cutting_in",
        "deaf",
        "deaf_since",
        "hearing",
        "pauses",
        "read_back_until",
        "restored",
        "restored_from",
        "restored_until",
        "unanswered",
        "wasted",
    )

    def __init__(self, call_id: str, settings: CallSettings, *, direction: str = "") -> None:
        super().__init__(call_id, settings, direction=direction)
        self.hearing: Hearing | None = None  # the caller's open turn
        self.deaf = False  # the event stream is down: the caller's words do not reach us
        self.deaf_since = 0.0  # when it went down
        self.pauses = Pauses()
        # the words of the answered turn whose final has not come: it must not open a turn
        self.answered = ""
        self.answered_until = 0.0
        self.wasted = 0  # backend calls dropped because the caller went on
        self.cutting_in = -1  # the turn the agent cut in on: its reply is not barged in on
        # the answered words a late final said otherwise (a digit more, a "don't"): the turn
        # it opens takes their place in the history instead of following them
        self.correcting = ""
        # the open turn a restart found unanswered, and the first of its words that may stand
        # on interims whose final is still to come (-1: none may)
        self.restored: Hearing | None = None
        self.restored_from = -1
        self.restored_until = 0.0
        # `reply_on = "final"`: the turn a restart found asked for and unanswered (-1: none)
        self.unanswered = -1
        # the stream came back with the caller's turn open: what they said while it was down is
        # being read back, and their turn is not over before it came (or until then)
        self.read_back_until = 0.0

    def _restored(self, now: float) -> None:
        """The last turn the history shows answered may have been answered on its interims,
        and its final be read back only now: it must not be answered again. One it shows
        asked for and unanswered stays the open turn: its finals must not add its words twice."""
        msgs = self.history.msgs
        if len(msgs) >= 2 and msgs[-1].role == "assistant" and msgs[-2].role == "user":
            self.answered = msgs[-2].text
            self.answered_until = now + _RESTORED_S
        elif msgs and msgs[-1].role == "user" and not self._speculating:
            self.unanswered = self.turns.turn  # its final was handled: none is read back new
        elif msgs and msgs[-1].role == "user":
            # which of its words came only from interims is not saved (the store has no field
            # for it): any of them may have a final still to be read back
            text = msgs[-1].text
            h = Hearing([text], started_at=now, changed_at=now, in_history=text)
            self.hearing = self.restored = h
            self.restored_from = 0
            self.restored_until = now + _RESTORED_S

    def _resume_turn(self, now: float) -> list[Command]:
        """The turn the store shows asked for and unanswered is asked again: by its final's
        read-back, or once that had time to come (a final handled before the restart is never
        read back to do it)."""
        h = self.restored
        if self.unanswered < 0 and (h is None or h is not self.hearing):
            return []
        return [StartTimer(self.id, Timer(TimerKind.ENDPOINT), self.settings.final_wait_s)]

    def _ask_unanswered(self, now: float) -> list[Command]:
        """`reply_on = "final"`: the turn a restart found asked for and unanswered is asked
        again, for the words the store has, unless a final since joined it to a new turn."""
        turn, self.unanswered = self.unanswered, -1
        msgs = self.history.msgs
        if (
            turn != self.turns.turn
            or self.turns.replying
            or not self.phase.live
            or not msgs
            or msgs[-1].role != "user"
        ):
            return []
        text = msgs[-1].text
        self.turns.step(TurnInput.TRANSCRIPT)
        self.history.revise_user(text, text, self.turns.turn)
        self.held.clear()
        self.hold_until = now
        self.turn_times = {"transcript": now}
        window = self.history.window(self.settings.history_limit)
        return [*self._arm_filler(now, now), self._asking(window)]

    @property
    def _speculating(self) -> bool:
        return self.settings.reply_on == "interim"

    # -- inputs ----------------------------------------------------------------------------------

    def on_speech(self, event: SpeechEvent, now: float) -> list[Command]:
        if not self._speculating or event.kind != "interim" or event.direction != "in":
            return super().on_speech(event, now)
        if not self.phase.live or not words(event.message) or self._cutting_in(now):
            return []  # an interim of no words ("?", "..."): nothing to hear, nor to answer
        if self.speech_since is None:
            self.speech_since = now
        self.heard_words = True
        h = self._open_turn(now)
        if self._thinking_backchannel(h, event.message):
            # "okay" while the agent thinks: no new words for the turn, unless more follow;
            # the reply under way waits for them (or for the final that says it was all)
            return self._extend_hold(now)
        cmds: list[Command] = []
        if h is None:
            if self._closing():
                return []  # words after the goodbye
            if self.greeting_answers(event.message, self._began(now)):
                return []  # "hello?" before the greeting is over: no turn (its final says so)
            if self.playback.talking(now):
                # the agent's audio plays: only words that pass the barge-in gate take the turn
                cmds = self._speech_barge_in(event, now)
                if not cmds:
                    return []
            h = self.hearing = Hearing(started_at=now)
        gap = now - h.changed_at
        if not h.on_interim(event.message, now):
            return cmds
        limit = self.settings.max_turn_s
        if limit > 0 and now - h.started_at > limit:
            return cmds + self._cut_in(h, now)
        return cmds + self._words_grew(h, gap, now)

    def on_transcript(self, event: TranscriptEvent, now: float) -> list[Command]:
        if not self._speculating or not event.message.strip():
            return super().on_transcript(event, now)
        if event.direction != "in":
            return []
        if not self.turns.mark_seen(event.id) or not self.phase.live:
            return []
        began = self._began(now)
        self._utterance_over()
        self.transcript_due = False
        if self._cutting_in(now):
            return []  # the rest of the turn the agent cut short: it is answering
        h = self._open_turn(now)
        if self._answered(event.message, now, h):
            return []  # the late final of words already answered
        if h is not None and self._thinking_backchannel(h, event.message):
            return self._backchannel_while_thinking(event.message, now)
        correcting, self.correcting = self.correcting, ""
        cmds: list[Command] = []
        if h is None:
            if self._closing():
                return []  # words after the goodbye
            no_turn = self._not_a_turn(event.message, began, now)
            if no_turn:
                return no_turn
            s = self.settings
            if (
                self.playback.talking(now)
                and s.barge_in != "off"
                and not self._kept(now)
                and not self._talked_first(began, now)
            ):
                cmds = self._cut(now, "transcript")
            h = self.hearing = Hearing(started_at=now, in_history=correcting)
        gap = now - h.changed_at
        grew = self._rejoin(h, event.message, now)
        if grew is not None:
            if grew:
                return cmds + self._words_grew(h, gap, now)
            # no new words; the restored turn, not asked for since the restart, is answered now
            return cmds + (self._final_confirms(h, now) if h.asked else self._due(h, now))
        if not h.on_final(event.message, now):
            return cmds + self._final_confirms(h, now)
        return cmds + self._words_grew(h, gap, now)

    def _rejoin(self, h: Hearing, text: str, now: float) -> bool | None:
        """Set the final `text` into `h` if it is the open turn restored from the store and
        the final repeats some of its words: whether that brought new words. None: it is not
        that turn, or the final's words are all new (it joins the turn as any final does)."""
        if h is not self.restored:
            return None
        joined = None
        if self.restored_from >= 0 and now <= self.restored_until:
            joined = rejoin(h.finals[0], self.restored_from, text)
        if joined is None:
            self.restored, self.restored_from = None, -1  # the interims' finals are all in
            return None
        before = h.text()
        h.finals[0], self.restored_from = joined
        if self.restored_from < 0:
            self.restored = None
        h.final_at = now
        if goes_on(h.text(), before):
            h.changed_at = now
            return True
        return False

    def on_endpoint(self, now: float) -> list[Command]:
        """The timer of the open turn: ask the backend, or end the turn, when due."""
        h = self.hearing
        if self.deaf:
            return []  # no words is no pause: the stream's return decides
        if h is None:
            return self._ask_unanswered(now) if self.unanswered >= 0 else []
        if self._heard_reply(h, now):
            return []
        return self._due(h, now)

    def on_stream(self, event: StreamState, now: float) -> list[Command]:
        """While the event stream is down no words arrive, which is no pause of the caller's:
        nothing is taken for the end of their turn. Once it is back, the open turn's pause
        counts from then, while what they said meanwhile is read back."""
        was_deaf, self.deaf = self.deaf, not event.up
        if self.deaf and not was_deaf:
            self.deaf_since = now
        if self.deaf or not was_deaf:
            return []
        h = self.hearing
        if h is None or self._heard_reply(h, now):
            return self._back_on_finals(now)
        ended = h.final  # its words came read back over REST: the STT had ended them
        h.changed_at = max(h.changed_at, now)
        if ended:
            h.final_at = h.changed_at
        # the turn's reply may be asked for, not said: the caller may have gone on unheard, and
        # a reply to their first words, said and then cut when the rest is read back, is the
        # agent talking over itself. Read back at once (the daemon's reconcile reads every
        # call back too, but after a page of calls); a read-back that fails costs the wait
        self.read_back_until = now + self.settings.final_wait_s
        return [*self._fetch_transcripts(), *self._due(h, now)]

    def _back_on_finals(self, now: float) -> list[Command]:
        """The stream is back and no turn is open on interims (`reply_on = "final"`, or none
        was): the caller's turn is open all the same while its reply is unsaid (a final joins
        it) or an utterance of theirs awaits its final. Its reply waits for the read-back as
        on interims; sentences held while the stream was down wait for it too."""
        cmds: list[Command] = []
        if self.unsaid or self.speech_since is not None or self.unanswered >= 0:
            self.read_back_until = now + self.settings.final_wait_s
            cmds += self._fetch_transcripts()
        if self.unanswered >= 0:
            # a turn a restart left unanswered: asked again after the read-back, or without it
            timer = Timer(TimerKind.ENDPOINT)
            cmds.append(StartTimer(self.id, timer, self.settings.final_wait_s))
        if self.held:
            wait = max(0.0, self.held_until() - now)
            cmds.append(StartTimer(self.id, Timer(TimerKind.HOLD), wait))
        return cmds

    def read_back(self, now: float) -> list[Command]:
        """A read-back was handled: an open turn held for it ends when its time has come."""
        if self.read_back_until <= now:
            return []
        self.read_back_until = 0.0
        if self.hearing is None:
            # the turn of finals: its hold, if any, is its own again; one a restart left
            # unanswered, and no final of the read-back joined, is asked again now
            return self.on_hold(now) if self.unanswered < 0 else self.on_endpoint(now)
        return self.on_endpoint(now)

    def held_until(self) -> float:
        """While the stream is down, a reply nothing of which was said waits for its return
        (the caller may be going on unheard), then for the read-back of what they said; but
        no longer than a read-back is waited for (`final_wait_s`) past the end of its hold, or
        of the stream if it dropped later: a long outage must not leave the caller in silence."""
        if self.deaf and self.said_turn != self.turns.turn:
            return max(self.hold_until, self.deaf_since) + self.settings.final_wait_s
        return max(self.hold_until, self.read_back_until)

    def on_silence(self, now: float) -> list[Command]:
        """The silence timer; while the stream is down the caller may be talking unheard, and
        while their turn is open they are talking: the reprompt waits a whole silence more."""
        h = self.hearing
        if h is not None and not h.asked and not words(h.text()):
            self.hearing = h = None  # nothing to answer: no open turn either
        if self.deaf or (h is not None and not h.asked):
            # deaf, or the caller's turn is open: they are not the quiet one. An open turn
            # long over is asked now (whatever left its timer unarmed)
            self.silence_due = NEVER  # it has fired
            cmds = [] if self.deaf or h is None else self._due(h, now)
            return [*cmds, *self.silence_timer(now, self.settings.silence_s)]
        return super().on_silence(now)

    def _thinking_backchannel(self, h: Hearing | None, text: str) -> bool:
        """Whether `text` is a backchannel begun after the turn's words, while its reply is
        under way and unsaid: a new utterance (no interim of the turn in progress), of no
        words the backend needs."""
        return (
            self.unsaid
            and (h is None or (bool(h.finals) and not h.waiting and not words(h.interim)))
            and is_backchannel(text, self.settings.backchannels)
        )

    # -- the open turn ---------------------------------------------------------------------------

    def _open_turn(self, now: float) -> Hearing | None:
        """The caller's open turn; one whose reply the caller hears is answered: closed."""
        h = self.hearing
        if h is not None and self._heard_reply(h, now):
            self.answered = h.unconfirmed()
            self.answered_until = now + self.settings.transcript_due_s
            if h is self.restored:
                # answered before the read-back: the restored words may still have finals due
                pending = words(h.finals[0])[self.restored_from :]
                self.answered = " ".join(filter(None, (*pending, self.answered)))
                self.answered_until = now + _RESTORED_S
                self.restored, self.restored_from = None, -1
            self.hearing = h = None
        return h

    def _cutting_in(self, now: float) -> bool:
        """The agent cut a long turn short and is answering: the caller's words wait."""
        return self.cutting_in == self.turns.turn and (
            self.turns.replying or self.playback.talking(now)
        )

    def _cut_in(self, h: Hearing, now: float) -> list[Command]:
        """The caller's turn ran past `agent.max_turn_s`: say so politely and answer it."""
        cmds: list[Command] = [
            Record(self.id, Kind.CUT_IN, {"turn_s": round(now - h.started_at, 1)})
        ]
        if h.stale():
            cmds += self._drop_reply(h, now)
        if not h.asked:
            cmds += self._ask_for(h, h.text(), now)
        self.hearing = None
        self.answered = ""
        self.cutting_in = self.turns.turn
        self.hold_until = now
        return [*cmds, *self._say(self.settings.cut_in, self.turns.turn, now)]

    def finals_read_back(self, seen: list[TranscriptEvent]) -> None:
        """Of a read-back, the transcripts the call had already handled. If the newest of them
        ends with the answered words, their final came before a restart (`_restored` could not
        tell, and kept them waiting for it for `_RESTORED_S`): a final after it that says nearly
        the same ("Monday", then "Tuesday") is the caller's new turn, not that final."""
        if not seen or not self.answered:
            return
        last = words(seen[-1].message)
        if last and words(self.answered)[-len(last) :] == last:
            self.answered = ""

    def _answered(self, text: str, now: float, h: Hearing | None) -> bool:
        """Whether the final `text` repeats words of the answered turn whose final had not
        come, and is not the open turn's own (a caller may ask the same thing again); it takes
        its words off, and new words end the matching.

        A final that is the answered words written otherwise is theirs too: with a word
        revised or inserted ("credit card" for "card") it corrects them in the history, the
        reply heard stands; with words said after them, which the interims had not shown yet
        ("what time do you" + "close"), the turn is answered again, for them."""
        live = bool(self.answered) and now <= self.answered_until
        if live and not self._settled(text) and covers(text, self.answered):
            if extends(text, self.answered):
                self.correcting = self.answered  # answered again, in their place
            elif h is None and self.history.correct_user(
                self.answered, text.strip(), self.turns.turn
            ):
                self.answered = ""
                return True
        if not live or not self._settled(text):
            self.answered = ""
            return False
        if h is not None and not goes_on(text, h.unconfirmed()):
            return False  # the open turn's own words
        rest = words(self.answered)[len(words(text)) :]
        self.answered = " ".join(rest)
        return True

    def _settled(self, text: str) -> bool:
        """Whether the final `text` is the answered words: repeats them, or only writes them
        otherwise (a filler dropped, a "please", punctuation, spacing)."""
        return not goes_on(text, self.answered) or settles(text, self.answered)

    def _heard_reply(self, h: Hearing, now: float) -> bool:
        """Whether the audio of this turn's reply (or of the fallback said for it) started.
        The filler is no reply: the turn it covers may still go on, and be asked again."""
        if not h.asks:
            return False
        turn = self.turns.turn
        filler = self.settings.filler if self.filler_turn == turn else None
        starts = [p.start for p in self.playback.pieces if p.turn == turn and p.text != filler]
        return bool(starts) and min(starts) <= now

    def _words_grew(self, h: Hearing, gap: float, now: float) -> list[Command]:
        """The caller said more: drop a reply asked with fewer words, then see what is due."""
        cmds: list[Command] = []
        self.filler_due_at = NEVER
        if h.stale():
            if h.ended:
                self.pauses.went_on_after(gap)
            h.ended = False
            h.asked = ""
            cmds += self._drop_reply(h, now)
        return cmds + self._due(h, now)

    def _final_confirms(self, h: Hearing, now: float) -> list[Command]:
        """A final with no new words: the STT says the utterance ended. Words that seemed to go
        on ("and", "um") are over after all once the caller stays quiet a little longer."""
        if h.asked or cue(h.text(), self.settings.language) is not Cue.GOING_ON:
            return []
        return self._due(h, now)

    def _drop_reply(self, h: Hearing, now: float) -> list[Command]:
        """The reply was asked with fewer words: cancel it; cut it if it was sent, unheard."""
        self.wasted += 1
        h.wasted += 1
        if self.said_turn != self.turns.turn:
            self.held.clear()
            return self._drop_unsaid({"wasted": h.wasted})
        turn = self.turns.turn
        self.after_reply = None  # an end_call or a transfer meant for fewer words
        joined = Record(self.id, Kind.TURN_JOINED, {"turn": turn, "wasted": h.wasted})
        return [joined, *self._cut(now, "caller went on")]

    def _due(self, h: Hearing, now: float) -> list[Command]:
        """Ask the backend and end the turn when their time has come; else wait for it."""
        s = self.settings
        text = h.text()
        c = cue(text, s.language)
        if c is Cue.GOING_ON and h.final:
            c = Cue.OPEN  # the STT heard the end of it: trust the pause
        # words that go on and then nothing, not even their final (lost): over after a while
        wait = self.pauses.wait(c, s.end_of_turn_s, 2 * s.final_wait_s, s.say_latency_s)
        if s.cut == "restart" and c in (Cue.DONE, Cue.OPEN):
            # a reply sent too early is retracted with a /stop and a new session (a question
            # is trusted to end the turn)
            wait = max(wait, s.end_of_turn_stop_s)
        end_at = h.changed_at + wait
        if h.final and c is not Cue.QUESTION:
            end_at = max(end_at, h.final_at + s.final_hold_s)  # a split's next final is near
        end_at = max(end_at, self.read_back_until)
        ask_at = h.changed_at + (0.0 if c in (Cue.QUESTION, Cue.DONE) else s.speculate_s)
        if c is Cue.GOING_ON:
            ask_at = end_at  # words that go on: asked only once the turn is over
        if h.asks >= s.max_speculative:
            ask_at = end_at  # enough was wasted on this turn: ask once it is over
        cmds: list[Command] = []
        if not h.asked and now >= ask_at - _EPS:
            cmds += self._ask_for(h, text, now)
        self.hold_until = end_at
        if now >= end_at - _EPS:
            if not h.ended:
                h.ended = True
                cmds += self._arm_filler(now, now)
            return cmds + self.on_hold(now)
        nxt = end_at if h.asked else min(ask_at, end_at)
        return [*cmds, StartTimer(self.id, Timer(TimerKind.ENDPOINT), max(0.0, nxt - now))]

    def _ask_for(self, h: Hearing, text: str, now: float) -> list[Command]:
        """Ask the backend for the reply to `text`, the caller's whole turn so far."""
        cmds = self._timing_flushed()
        if self.turns.replying:
            self.turns.step(TurnInput.END)
            cmds.append(CancelBackend(self.id, self.turns.turn))
        self.turns.step(TurnInput.TRANSCRIPT)
        # the history holds the turn once, with all of its words
        if not self.history.revise_user(h.in_history, text, self.turns.turn):
            self.history.user(text, self.turns.turn)
        h.in_history = text
        h.asks += 1
        h.asked = text
        self.held.clear()
        self.turn_times = {"transcript": h.changed_at}  # timed from the caller's last words
        return [*cmds, self._asking(self.history.window(self.settings.history_limit))]
