"""The conversation half of the call router: transcripts, speech, replies, silence.

Caller transcripts go to the backend at once; each sentence of the reply is spoken with /say as
soon as it exists, but not before the caller has been quiet for `final_hold_s` after their final
transcript: VoIPBIN's STT often splits one sentence into several finals about 0.5 s apart
(docs/protocol.md §10), and the caller still talking shows as interims. A final that comes
before anything of the reply was said joins the caller's turn: the reply is asked again for the
whole of it, and nothing is cut, since nothing played.

Caller speech while the agent's audio plays is a barge-in: the stale reply is cancelled by turn
id and the audio is cut — by /flush where the provider really cuts (gcp), else by /stop and a
fresh session (the only hard cut with ElevenLabs, docs/protocol.md §8.2). A backchannel ("mm-hmm",
"okay") is no barge-in and asks nothing. History keeps only what the caller could have heard.
"""

from __future__ import annotations

from difflib import SequenceMatcher

from agentd.call.core import NEVER, CallCore
from agentd.call.endpoint import words
from agentd.call.session import SessionInput
from agentd.call.settings import TURN_NUDGE
from agentd.call.turn import TurnInput
from agentd.commands import (
    AskBackend,
    CancelBackend,
    CheckCall,
    Command,
    FetchTranscripts,
    Flush,
    Message,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplyIncomplete,
    ReplySentence,
    StartTimer,
)
from agentd.events import SpeechEvent, TranscriptEvent, timestamp
from agentd.names import EndCall, Kind, Timer, TimerKind, TransferTo

_STALE_SPEECH_S = 15.0  # speech that long before its transcript was another utterance (a cough)
_ECHO_SHARE = 0.6  # words that are mostly the agent's own, as it speaks them, are its echo
_ECHO_MIN_WORDS = 3
# a backchannel's words, then its final ~1.1 s after them: one begun longer ago is no backchannel
_BACKCHANNEL_SPAN_S = 3.0
# words begun this close to the estimated end of the agent's audio may be an answer to it
_BACKCHANNEL_MARGIN_S = 0.3
# how long a caller the backend judged unfinished (○ / ◐) gets before it must answer anyway:
# Pipecat's defaults
_INCOMPLETE_S = 5.0
_INCOMPLETE_LONG_S = 10.0

#: What a listener says to show they follow, not to take the turn (lower case, no punctuation).
_BACKCHANNEL_WORDS = frozenset(
    {
        *("mm", "mhm", "mhmm", "mm-hmm", "mm-hm", "mm hmm", "uh-huh", "uh huh", "hmm", "uh", "um"),
        *("yeah", "yes", "yep", "yup", "ok", "okay", "right", "sure", "i see", "got it"),
        *("alright", "all right", "oh", "ah", "wow", "cool", "great", "nice", "true"),
        *("네", "예", "응", "음", "아", "어", "그렇군요", "그래요", "맞아요", "그렇죠", "맞습니다"),
        *("알겠어요", "알겠습니다"),
        *("はい", "ええ", "うん", "そう", "なるほど", "そうですね", "そうですか", "そっか"),
        *("嗯", "对", "好", "是", "好的", "是的", "对的", "明白"),
    }
)
#: as `words` makes them: the STT's "uh-huh" is compared as "uhhuh" (no punctuation, dashes)
BACKCHANNELS = frozenset(" ".join(words(b)) for b in _BACKCHANNEL_WORDS)


#: What someone picking up says before they know who calls: the greeting answers it.
SALUTATIONS = (
    *("hello", "hi", "hey", "hiya", "hallo"),
    *("good morning", "good afternoon", "good evening", "morning", "afternoon", "evening"),
)


# what separates words where a script writes no spaces ("はい、はい。"), and the full-width comma
_SEPARATORS = str.maketrans({c: " " for c in ",.!?\u3001\u3002\uff0c\uff01\uff1f"})


def is_backchannel(text: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether `text` is only a listener's acknowledgement ("mm-hmm", "yeah, okay"); `extra`
    adds words (`agent.backchannels`). One said over and over is one too, written without
    spaces as Japanese and Chinese are ("はいはい", "嗯嗯", "对对对")."""
    said = words(text.translate(_SEPARATORS))
    if not said or len(said) > 4:
        return False
    if extra:
        extra = tuple(" ".join(words(e)) for e in extra)  # compared as `words` makes them
    if " ".join(said) in BACKCHANNELS or " ".join(said) in extra:
        return True
    return all(_acknowledges(w, extra) for w in said)


def _acknowledges(word: str, extra: tuple[str, ...]) -> bool:
    """Whether `word` is a backchannel, or one said several times in a row without spaces
    (not in English, whose STT spaces words: "uh-uh" is a no)."""
    if word in BACKCHANNELS or word in extra:
        return True
    return not word.isascii() and any(
        word == b * (len(word) // len(b))
        for b in (*BACKCHANNELS, *extra)
        if b and " " not in b and len(word) % len(b) == 0
    )


class Conversation(CallCore):
    """Turn taking, replies and silence."""

    __slots__ = ()

    def on_transcript(self, event: TranscriptEvent, now: float) -> list[Command]:
        """A final caller transcript opens a turn and asks the backend."""
        if event.direction != "in":
            return []  # "out" is our own speech heard back: never answer it
        if not event.message.strip():
            self._utterance_over()  # a noise's empty final: its start is no one's any more
            return []
        if not self.turns.mark_seen(event.id) or not self.phase.live:
            return []
        no_turn = self._not_a_turn(event.message, self._began(now), now)
        if no_turn:
            # its utterance is over all the same: the next one begins afresh
            self._utterance_over()
            self.transcript_due = False
            return no_turn
        if self.unsaid:
            return self._join_turn(event, now)
        if self._closing():
            return []  # "bye" after the goodbye: the call ends, nothing more is answered
        cmds: list[Command] = []
        # the utterance began when its first speech event came; with none, when it arrived
        self.transcript_due = False
        began = self.speech_since if self.speech_since is not None else now
        if now - began > _STALE_SPEECH_S:
            began = now
        self._utterance_over()
        p = self.playback
        if (
            self.settings.barge_in != "off"
            and not self._kept(now)
            and not self._talked_first(began, now)
            and (self.turns.replying or (p.talking(now) and began < p.until))
        ):
            cmds += self._cut(now, "transcript")
        return [*cmds, *self._ask(event, now)]

    def _ask(self, event: TranscriptEvent, now: float) -> list[Command]:
        """Open the next turn with the caller's words and ask the backend."""
        self.turns.step(TurnInput.TRANSCRIPT)
        self.history.user(event.message.strip(), self.turns.turn)
        cmds = self._timing_flushed()  # the previous reply was cut before it was said
        self.turn_times = {"transcript": now}
        self.held.clear()
        self.hold_until = now + self.settings.final_hold_s
        window = self.history.window(self.settings.history_limit)
        cmds += self._arm_filler(self.hold_until, now)
        return [*cmds, self._asking(window)]

    def _asking(self, window: tuple[Message, ...]) -> AskBackend:
        marker = self.settings.turn_marker
        return AskBackend(self.id, self.turns.turn, window, marker=marker)

    def _join_turn(self, event: TranscriptEvent, now: float) -> list[Command]:
        """More of the caller's turn (a split sentence, or an afterthought) before anything of
        the reply was said: ask again for the whole turn; nothing played, so nothing is cut."""
        self._utterance_over()
        self.transcript_due = False
        return [*self._drop_unsaid({}), *self._ask(event, now)]

    def _drop_unsaid(self, data: dict[str, object]) -> list[Command]:
        """The caller's turn goes on before anything of its reply was said: the reply, and an
        action meant for the fewer words, are dropped; the turn is timed once, when answered."""
        turn = self.turns.turn
        self.after_reply = None
        self.timing_due = False
        if self.filler_turn == turn:
            # the caller's turn goes on as the next one, asked again: it had its "One moment."
            self.filler_turn = turn + 1
        cmds: list[Command] = [Record(self.id, Kind.TURN_JOINED, {"turn": turn, **data})]
        if self.turns.replying:
            self.turns.step(TurnInput.END)
            cmds.append(CancelBackend(self.id, turn))
        return cmds

    def _not_a_turn(self, text: str, began: float, now: float) -> list[Command]:
        """A backchannel while the agent talks or while its reply is under way, or the agent's
        own words heard back: recorded, and no turn (empty: the words are the caller's).

        While the agent talks is when the words began, not when their final came: that comes
        ~1 s after them, and a "mm-hmm" over the last second of a reply would take a turn."""
        if self._over_the_agent(began, now) and is_backchannel(text, self.settings.backchannels):
            return [Record(self.id, Kind.BACKCHANNEL, {"text": text.strip()})]
        if self.unsaid and is_backchannel(text, self.settings.backchannels):
            return self._backchannel_while_thinking(text, now)
        if self.greeting_answers(text, began):
            return [Record(self.id, Kind.BACKCHANNEL, {"text": text.strip(), "greeting": True})]
        if self._echo(text, began):
            return [Record(self.id, Kind.ECHO, {"text": text.strip()})]
        return []

    def on_speech(self, event: SpeechEvent, now: float) -> list[Command]:
        """Speech events: when an utterance began and ended, and barge-in by interims."""
        due: list[Command] = []
        if event.direction == "in" and self.phase.live:
            if event.kind == "interim" and self.speech_since is None:
                # from the first words: VoIPBIN publishes speech_started with them, never
                # before, and a speech_ended delivered after its transcript (no order is
                # guaranteed) must not open an utterance that would make the agent's own
                # words, heard back, look like the caller's
                self.speech_since = now
            ended = event.kind == "ended" or (
                event.kind == "boundary" and self.heard_words and not self._before_words(event)
            )
            self.heard_words = event.kind == "interim"
            if ended:
                # the utterance is over: its transcript should follow within a moment
                self.transcript_due = True
                timer = Timer(TimerKind.TRANSCRIPT_DUE)
                due = [StartTimer(self.id, timer, self.settings.transcript_due_s)]
            elif event.kind == "interim" and self.unsaid:
                # still talking after their final: keep the reply back for the rest
                due = self._extend_hold(now)
        return due + self._speech_barge_in(event, now)

    def _before_words(self, event: SpeechEvent) -> bool:
        """A boundary VoIPBIN published no later than the newest interim: the utterance's
        `speech_started`, published with its first words and delivered after them (order is
        not guaranteed), not its end, which is published with the final. Without both times
        it cannot be told, and counts as the end."""
        at, words = timestamp(event.at), timestamp(self.words_at)
        return at is not None and words is not None and at <= words

    def _utterance_over(self) -> None:
        """Its final transcript came: a speech boundary after it is that utterance's late end,
        not the start of the next one (nor an end whose transcript is still due)."""
        self.speech_since = None
        self.heard_words = False

    def _greeting_kept(self, now: float) -> bool:
        """The greeting plays and `agent.barge_in_greeting` is off: it is heard to the end, and
        what the caller said is answered after it."""
        return (
            not self.settings.barge_in_greeting
            and self.turns.turn == 0
            and self.playback.talking(now)
        )

    def _talked_first(self, began: float, now: float) -> bool:
        """The caller began before the greeting's audio did (a callee's "hello, who is this?"
        on picking up): the greeting started over them, they did not cut into it. It plays (a
        cut before its audio would leave it unsaid) and their words are answered after it."""
        p = self.playback
        if self.turns.turn != 0 or not p.talking(now):
            return False
        first = min((piece.start for piece in p.pieces if piece.turn == 0), default=None)
        return first is None or began < first

    def _kept(self, now: float) -> bool:
        """What plays is heard to its end whatever the caller says: the greeting (unless
        `agent.barge_in_greeting`), or the line before an action (unless `barge_in_actions`)."""
        return self._greeting_kept(now) or (self._closing() and self.playback.talking(now))

    def _closing(self) -> bool:
        """The goodbye (or "transferring you") was said and its action waits for its end: the
        caller's words no longer open a turn (unless `agent.barge_in_actions`)."""
        return self.after_reply is not None and not self.settings.barge_in_actions

    def _echo(self, text: str, began: float) -> bool:
        """Whether `text`, heard from the caller's side, is the agent's own words coming back
        (a speakerphone, a line echo): speech that began while the agent's audio played, a run
        of at least three of its words and most of `text`. It is no turn and no barge-in. A
        caller who repeats the agent after it stopped is heard."""
        heard = words(text)
        if len(heard) < _ECHO_MIN_WORDS:
            return False
        for p in self.playback.pieces:
            if not p.start <= began < p.end:
                continue
            said = words(p.text)
            run = SequenceMatcher(None, said, heard, autojunk=False).find_longest_match()
            if run.size >= max(_ECHO_MIN_WORDS, _ECHO_SHARE * len(heard)):
                return True
        return False

    def _over_the_agent(self, began: float, now: float) -> bool:
        """Whether words whose final came at `now` were said while the agent talked: it still
        does, or they began (recently: a backchannel's final follows it within a few seconds)
        well before its audio ended. A "yes" at the very end of a question answers it."""
        p = self.playback
        if p.talking(now):
            return True
        if now - began > _BACKCHANNEL_SPAN_S or began >= p.until - _BACKCHANNEL_MARGIN_S:
            return False
        return not (p.pieces and p.pieces[-1].text.rstrip().endswith("?"))

    def greeting_answers(self, text: str, began: float) -> bool:
        """Whether `text` is a "hello?" said before the greeting was over (a callee picking
        up, a caller who talks first): the greeting answers it, a reply would follow it back
        to back. Words that ask for something more are answered after the greeting."""
        greeting = self.greeting_text()
        if self.turns.turn or not greeting:
            return False
        p = self.playback
        to_say = any(turn == 0 for turn, _ in p.queued)  # its session was replaced
        # said: only words begun over its own audio (a turn-0 reprompt's is no greeting)
        over_it = began < p.until and bool(p.pieces) and p.pieces[-1].text.strip() in greeting
        if self.greeted and not to_say and not over_it:
            return False
        return is_backchannel(text, (*self.settings.backchannels, *SALUTATIONS))

    def _began(self, now: float) -> float:
        """When the caller's current utterance began: its first speech event, or `now`."""
        return self.speech_since if self.speech_since is not None else now

    def _arm_filler(self, end: float, now: float) -> list[Command]:
        """The caller's turn ends at `end`: a filler is due if the reply is slow to come."""
        after = self.settings.filler_after_s
        if after <= 0:
            return []
        self.filler_due_at = end + after
        return [StartTimer(self.id, Timer(TimerKind.FILLER), self.filler_due_at - now)]

    def on_filler(self, now: float) -> list[Command]:
        """The turn is over and nothing of the reply is ready: say the filler, once a turn."""
        turn = self.turns.turn
        if (
            now < self.filler_due_at - 0.01
            or not self.phase.live
            or not self.turns.replying
            or self.held
            or turn in (self.said_turn, self.filler_turn)
            or self.playback.talking(now)
        ):
            return []
        self.filler_turn = turn
        return [
            Record(self.id, Kind.FILLER, {"turn": turn}),
            *self._say(self.settings.filler, turn, now),
        ]

    @property
    def unsaid(self) -> bool:
        """A reply is under way (or held) and nothing of it has been said yet."""
        return self.said_turn != self.turns.turn and (self.turns.replying or bool(self.held))

    def _extend_hold(self, now: float) -> list[Command]:
        # these words will have a final of their own (~1.1 s after them): it joins the turn.
        # Nor is a filler due before the turn's end: it would talk over the caller
        self.hold_until = max(self.hold_until, now + self.settings.final_wait_s)
        pending = self.filler_due_at != NEVER and self.filler_turn != self.turns.turn
        filler = self._arm_filler(self.hold_until, now) if pending else []
        if not self.held:
            return filler
        return [*filler, StartTimer(self.id, Timer(TimerKind.HOLD), self.hold_until - now)]

    def _backchannel_while_thinking(self, text: str, now: float) -> list[Command]:
        """A backchannel after the question, while its reply is under way: recorded, no turn.
        Joined, it would drop the reply and ask again, a backend's latency more for nothing.
        The reply was kept back for these words (`_extend_hold`): it now waits only as long
        as after any final, not for a final that has come."""
        self.hold_until = min(self.hold_until, now + self.settings.final_hold_s)
        cmds: list[Command] = [
            Record(self.id, Kind.BACKCHANNEL, {"text": text.strip(), "waiting": True})
        ]
        if self.held:
            wait = max(0.0, self.hold_until - now)
            cmds.append(StartTimer(self.id, Timer(TimerKind.HOLD), wait))
        return cmds

    def held_until(self) -> float:
        """When the reply's sentences may be said: the end of the caller's turn (`NEVER`: not
        known yet, whatever brings it says them)."""
        return self.hold_until

    def on_hold(self, now: float) -> list[Command]:
        """The caller stayed quiet after their final: say what the reply has so far."""
        if not self.held:
            return []
        until = self.held_until()
        if now < until - 0.01:
            if until == NEVER:
                return []
            return [StartTimer(self.id, Timer(TimerKind.HOLD), until - now)]
        held, self.held = self.held, []
        cmds: list[Command] = []
        for turn, text in held:
            if turn == self.turns.turn:
                cmds += self._speak(text, now)
        return cmds

    def _speech_barge_in(self, event: SpeechEvent, now: float) -> list[Command]:
        s = self.settings
        if (
            s.barge_in != "speech"
            or event.direction != "in"
            or event.kind != "interim"
            or not self.phase.live
        ):
            return []  # a bare speech_started is a cough as often as a word: tentative only
        if not self.playback.talking(now):
            # nothing plays: nothing to cut (the usual interim: the caller talks, we listen);
            # a reply not said yet waits (held) and is asked again with their words
            return []
        words = event.message.split()
        if len(words) < s.barge_in_min_words and len(event.message.strip()) < s.barge_in_min_chars:
            return []
        if is_backchannel(event.message, s.backchannels) or self._kept(now):
            return []  # "mm-hmm" while we talk: the caller is listening
        began = self._began(now)
        if self.greeting_answers(event.message, began):
            return []  # "hello?" over the greeting: the greeting is the answer
        if self._talked_first(began, now) or self._echo(event.message, began):
            return []
        if now - self.playback.talk_started(now) < s.echo_guard_s:
            return []  # line echo or a breath right after we started talking
        return self._cut(now, "speech")

    def _cut(self, now: float, trigger: str) -> list[Command]:
        """Barge-in: drop the stale reply, cut the audio, keep only what was heard."""
        turn = self.turns.turn
        cmds: list[Command] = [Record(self.id, Kind.BARGE_IN, {"turn": turn, "by": trigger})]
        if self.turns.replying:
            cmds.append(CancelBackend(self.id, turn))
        self.turns.step(TurnInput.CUT)
        if self.playback.playing(now) and self.speaking.active:
            assert self.speaking.id is not None
            if self.settings.cut == "flush":
                cmds.append(Flush(self.id, self.speaking.id))
            else:
                self.speaking.step(SessionInput.CUT)
                cmds += self._stop("speaking", self.speaking.id, abandon=True)
        for cut_turn, heard in self.playback.cut(now).items():
            self.history.set_reply(cut_turn, heard)
        return cmds

    def on_sentence(self, event: ReplySentence, now: float) -> list[Command]:
        """One sentence of the current reply: speak it now."""
        if not self.turns.current(event.turn) or not self.phase.live:
            return []  # stale: cut off by a barge-in or a newer turn
        text = event.text.strip()
        if not text:
            return []
        self.turn_times.setdefault("first_sentence", now)
        until = self.held_until()
        if self.held or now < until:
            # the caller may not be done: a split sentence's next final is ~0.5 s away
            self.held.append((self.turns.turn, text))
            if len(self.held) > 1 or until == NEVER:
                return []
            return [StartTimer(self.id, Timer(TimerKind.HOLD), until - now)]
        return self._speak(text, now)

    def _speak(self, text: str, now: float) -> list[Command]:
        self.history.extend_reply(text, self.turns.turn)
        if self.turns.replying:
            self.turns.step(TurnInput.SENTENCE)
        self.said_turn = self.turns.turn
        return self._say(text, self.turns.turn, now)

    def on_reply_done(self, event: ReplyDone, now: float) -> list[Command]:
        """The reply is complete: record its timings, then run the action it asked for."""
        if not self.turns.current(event.turn):
            return []
        self.turns.step(TurnInput.DONE)
        if event.first_chunk_at is not None:
            self.turn_times["first_token"] = event.first_chunk_at
        spent: list[Command] = []
        if event.tokens is not None:
            data: dict[str, object] = {
                "turn": event.turn,
                "input": event.tokens[0],
                "output": event.tokens[1],
            }
            spent.append(Record(self.id, Kind.TOKENS, data))
        # a reply not said yet (held for the end of the caller's turn, or waiting for a new
        # session) is timed once it is
        self.timing_due = "first_say" not in self.turn_times and self.unsent
        cmds: list[Command] = spent if self.timing_due else [*spent, self._turn_record(now)]
        cmds += self.arm_silence(now)
        action = event.action
        if isinstance(action, TransferTo):
            allowed = self.allowed_number(action.number) if action.number else None
            if allowed is None:
                # a caller must not talk the agent into dialling a premium number
                why = "not in agent.transfer_numbers" if action.number else "no number given"
                cmds += self._transfer_failed(now, why, action.number)
            action = None if allowed is None else TransferTo(allowed)
        if (
            isinstance(action, EndCall)
            and self.phase.live
            and self.said_turn != event.turn
            and not self.unsent
        ):
            # a model often ends the call with the tool call alone: not hung up on without a word
            cmds += self._speak(self.settings.goodbye, now)
        if action is not None and self.phase.live:
            # let the goodbye (or "transferring you now") finish playing first
            self.after_reply = action
            cmds.append(Record(self.id, Kind.ACTION, {"action": str(action)}))
            wait = self.playback.remaining(now) + self.settings.playback_pad_s
            cmds.append(StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), wait))
        return cmds

    def _transfer_failed(self, now: float, why: str, number: str = "") -> list[Command]:
        """The caller stays with the agent, and is told so."""
        data: dict[str, object] = {"what": "transfer failed", "error": why}
        if number:
            data["number"] = number
        text = self.settings.transfer_failed_text
        error = Record(self.id, Kind.ERROR, data)
        if self.held:
            # after the reply it follows ("let me connect you"), still held back
            self.held.append((self.turns.turn, text))
            return [error]
        self.history.assistant(text, self.turns.turn)
        return [error, *self._say(text, self.turns.turn, now)]

    def on_reply_incomplete(self, event: ReplyIncomplete, now: float) -> list[Command]:
        """The backend judged the caller unfinished: no reply yet. New words ask again; if none
        come for a while, the backend is told to answer now."""
        if not self.turns.current(event.turn) or not self.phase.live:
            return []
        self.turns.step(TurnInput.END)
        self.held.clear()
        self.timing_due = False
        self.incomplete_turn = event.turn
        wait = _INCOMPLETE_LONG_S if event.long else _INCOMPLETE_S
        return [
            Record(self.id, Kind.TURN_INCOMPLETE, {"turn": event.turn, "long": event.long}),
            StartTimer(self.id, Timer(TimerKind.INCOMPLETE), wait),
        ]

    def on_incomplete(self, now: float) -> list[Command]:
        """The caller the backend judged unfinished stayed quiet: ask for the reply now."""
        if (
            self.incomplete_turn != self.turns.turn
            or self.turns.replying
            or not self.phase.live
            or now - self.last_caller < _INCOMPLETE_S - 0.05
        ):
            return []
        self.turns.step(TurnInput.TRANSCRIPT)
        self.hold_until = now
        self.turn_times = {"transcript": now}
        window = (*self.history.window(self.settings.history_limit), ("system", TURN_NUDGE))
        return [AskBackend(self.id, self.turns.turn, window)]

    def on_reply_failed(self, event: ReplyFailed, now: float) -> list[Command]:
        """The backend failed: say the fallback line unless part of the reply was said."""
        if not self.turns.current(event.turn) or not self.phase.live:
            return []
        self.turns.step(TurnInput.FAILED)
        cmds: list[Command] = [
            Record(self.id, Kind.BACKEND_FAILED, {"turn": event.turn, "error": event.error})
        ]
        fallback = self.settings.fallback_text
        # a part held back for the end of the caller's turn is said; no fallback on top of it
        if fallback and not self.history.has_reply(self.turns.turn) and not self.held:
            self.history.assistant(fallback, self.turns.turn)
            cmds += self._say(fallback, self.turns.turn, now)
        return cmds

    def on_silence(self, now: float) -> list[Command]:
        """The silence timer: reprompt a quiet caller, and end the call after a few."""
        self.silence_due = NEVER  # it has fired: none runs now
        s = self.settings
        if not self.phase.live:
            return []
        if self.unheard:
            # our transcribe is down and being started again: the caller may have talked all
            # along. A reprompt would ask them to talk to nobody, and the silence goodbye would
            # hang up on someone we could not hear. Their silence counts again once it is back
            return self.arm_silence(now)
        if (
            self.turns.replying
            or self.held
            or self.after_reply is not None
            or self.playback.talking(now)
        ):
            # a reply is coming (its end arms the timer again) or playing: counted once more
            # all the same, so that no path that forgets it leaves a live call without a reprompt
            return self.arm_silence(now)
        quiet_since = max(self.last_caller, self.playback.until)
        if now - quiet_since < s.silence_s - 0.05:  # timers fire a hair early or late
            return self.silence_timer(now, quiet_since + s.silence_s - now)
        self.reprompts += 1
        # a silent caller, or an STT that stopped hearing one (measured with Google's after ~5
        # minutes while the transcribe still says progressing): worth a warning either way
        quiet = Record(
            self.id,
            Kind.STT_QUIET,
            {"quiet_s": round(now - self.last_caller, 1), "stt_provider": s.stt_provider},
        )
        if self.reprompts > s.max_silence_reprompts:
            return [
                quiet,
                Record(self.id, Kind.SILENCE_HANGUP, {}),
                *self._goodbye(s.silence_goodbye, now),
            ]
        cmds = [quiet, *self._replace_deaf_transcribe()]
        self.history.assistant(s.reprompt_text, self.turns.turn)
        return [*cmds, *self._say(s.reprompt_text, self.turns.turn, now), *self.arm_silence(now)]

    def _replace_deaf_transcribe(self) -> list[Command]:
        """The caller should have answered by now: the STT may be the one that is silent.

        A transcribe can go deaf while it still says `progressing` (Google's after about five
        minutes; one orphaned by a restarted pod), and VoIPBIN says nothing. A new one costs two
        requests and is in place before the reprompt's answer; once per quiet spell, so never
        twice before a silence hangup."""
        t = self.transcribe
        if self.stt_replaced or not t.active or t.id is None:
            return []
        self.stt_replaced = True
        old = t.id
        t.step(SessionInput.LOST)
        return [
            Record(self.id, Kind.TRANSCRIBE_RESTARTED, {"why": "caller quiet", "old": old}),
            # the quiet may be lost events, not a deaf STT (a subscription that took effect
            # after the reconcile): what the old one heard is read back, or it is lost with it
            FetchTranscripts(self.id, old),
            *self._stop("transcribe", old),
            *self._start("transcribe"),
        ]

    def on_watch(self, now: float) -> list[Command]:
        """Nothing heard of the call for a while: ask VoIPBIN, less often while it stays quiet."""
        s = self.settings
        quiet = now - self.last_heard
        if quiet < s.watch_s:
            self.watch_delay = s.watch_s
            return [StartTimer(self.id, Timer(TimerKind.WATCH), s.watch_s - quiet)]
        delay, self.watch_delay = self.watch_delay, min(self.watch_delay * 2, s.watch_max_s)
        return [
            CheckCall(self.id),
            *self._fetch_transcripts(),
            StartTimer(self.id, Timer(TimerKind.WATCH), delay),
        ]

    def on_transcript_due(self, _now: float) -> list[Command]:
        """Speech ended a while ago and no transcript came: read them back."""
        if not self.transcript_due:
            return []
        self.transcript_due = False
        return self._fetch_transcripts()
