"""When the bot answers a message and when it records one: pure rules, tested with plain values."""

from __future__ import annotations

from dataclasses import dataclass

from storage import AnswerMode, RecordMode

DEFAULT_ANSWER_MODE: AnswerMode = "mention"
DEFAULT_RECORD_MODE: RecordMode = "all"


@dataclass(frozen=True)
class MessageFacts:
    """What the rules need to know about one message, read off the Discord message by the client."""

    from_self: bool
    """Written by this bot (its own answers are stored by the pipeline, not from the gateway)."""
    from_bot: bool
    """Written by another bot or a webhook."""
    is_dm: bool
    mentions_bot: bool
    """The text mentions the bot (`<@id>`); @everyone does not count."""
    replies_to_bot: bool
    """A reply to one of the bot's messages."""
    is_system: bool = False
    """A join, pin, thread-created ... notice rather than something a person wrote."""
    is_forward: bool = False
    """A forwarded message: someone else's words, which cannot mention the bot and reply to nothing."""


@dataclass(frozen=True)
class Decision:
    record: bool
    """Store the message in its channel's history."""
    answer: bool
    """Answer it (implies `record`)."""


IGNORE = Decision(record=False, answer=False)


def decide(facts: MessageFacts, *, answer_mode: AnswerMode | None, record_mode: RecordMode | None,
           answer_dms: bool, answer_bots: bool) -> Decision:
    """The bot's rules: answer when addressed (mention, DM, reply to it) or in an "always" channel; other bots
    only with `answer_bots`; record what it answers, and everything else when the channel records "all".

    A forward is addressed only in a DM: in a channel it never is (it cannot carry a mention of its own, and its
    reference is no reply), so there it is recorded, not answered, whatever the channel's answer mode."""
    if facts.from_self or facts.is_system:
        return IGNORE
    if facts.is_dm and not answer_dms:
        return IGNORE
    if facts.is_forward:
        wanted = facts.is_dm
    else:
        addressed = facts.mentions_bot or facts.replies_to_bot or facts.is_dm
        wanted = addressed or (answer_mode or DEFAULT_ANSWER_MODE) == "always"
    # Two bots that answer each other would never stop: other bots are context unless explicitly allowed.
    answer = wanted and (not facts.from_bot or answer_bots)
    record = answer or (record_mode or DEFAULT_RECORD_MODE) == "all"
    return Decision(record=record, answer=answer)
