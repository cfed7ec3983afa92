"""Pure rules of the Discord layer: triggers, per-user limits, start-up checks."""

from __future__ import annotations

import pytest

from bot.discord_app.app import serve
from bot.discord_app.triggers import Decision, MessageFacts, decide
from bot.errors import RateLimited, UserInputError
from bot.pipeline.limits import UserLimiter
from bot.settings import Settings


def facts(**changes: bool) -> MessageFacts:
    base = {"from_self": False, "from_bot": False, "is_dm": False, "mentions_bot": False, "replies_to_bot": False}
    return MessageFacts(**{**base, **changes})


def rules(f: MessageFacts, answer_mode=None, record_mode=None, answer_dms=True, answer_bots=False) -> Decision:
    return decide(f, answer_mode=answer_mode, record_mode=record_mode, answer_dms=answer_dms,
                  answer_bots=answer_bots)


def test_addressed_messages_are_answered() -> None:
    for f in (facts(mentions_bot=True), facts(replies_to_bot=True), facts(is_dm=True)):
        assert rules(f) == Decision(record=True, answer=True)


def test_plain_messages_follow_the_channel_modes() -> None:
    assert rules(facts()) == Decision(record=True, answer=False)
    assert rules(facts(), record_mode="addressed") == Decision(record=False, answer=False)
    assert rules(facts(), answer_mode="always") == Decision(record=True, answer=True)
    assert rules(facts(), answer_mode="always", record_mode="addressed") == Decision(record=True, answer=True)


def test_a_forward_is_answered_in_a_dm_only() -> None:
    assert rules(facts(is_forward=True, is_dm=True)) == Decision(record=True, answer=True)
    assert rules(facts(is_forward=True)) == Decision(record=True, answer=False)
    assert rules(facts(is_forward=True), answer_mode="always") == Decision(record=True, answer=False)
    assert rules(facts(is_forward=True), record_mode="addressed") == Decision(record=False, answer=False)
    assert rules(facts(is_forward=True, is_dm=True), answer_dms=False) == Decision(False, False)


def test_itself_system_messages_bots_and_dms_off() -> None:
    assert rules(facts(from_self=True, mentions_bot=True)) == Decision(False, False)
    assert rules(facts(is_system=True, mentions_bot=True)) == Decision(False, False)
    assert rules(facts(from_bot=True, mentions_bot=True)) == Decision(record=True, answer=False)
    assert rules(facts(from_bot=True, mentions_bot=True), answer_bots=True) == Decision(True, True)
    assert rules(facts(from_bot=True), record_mode="addressed") == Decision(False, False)
    assert rules(facts(is_dm=True), answer_dms=False) == Decision(False, False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_counts_requests_in_flight() -> None:
    limiter = UserLimiter(max_inflight=2, per_minute=100)
    with limiter.acquire("u"), limiter.acquire("u"):
        with pytest.raises(RateLimited) as err:
            limiter.acquire("u")
        assert err.value.user_message == "you have 2 requests running; wait for them to finish"
        assert isinstance(err.value, UserInputError)
        with limiter.acquire("someone else"):
            pass
    assert limiter.inflight("u") == 0
    with limiter.acquire("u"):
        assert limiter.inflight("u") == 1


def test_limiter_counts_requests_per_minute() -> None:
    clock = Clock()
    limiter = UserLimiter(max_inflight=5, per_minute=2, clock=clock)
    for _ in range(2):
        with limiter.acquire("u"):
            clock.now += 10
    with pytest.raises(RateLimited) as err:
        limiter.acquire("u")
    assert err.value.user_message == "you sent too many requests; try again in 40 s"
    assert err.value.retry_after_s == 40
    clock.now += 41
    with limiter.acquire("u"):
        pass


async def test_run_without_token_says_how_to_get_one(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(_env_file=None, discord_token=None, database_url="sqlite+aiosqlite:///:memory:")  # type: ignore[call-arg]
    assert await serve(settings) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DISCORD_TOKEN" in err and "Reset Token" in err
