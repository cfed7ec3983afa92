"""Delivering one answer in Discord: streamed into a reply to the request, continued where a cut-off run left it.

`answer_in_reply` runs the pipeline's `respond` for a stored request into a `MessageReplySink` replying to the
request's message. The first message of the answer is stored with the request as it is sent, so a later start
continues in it. Cancelled by a shutdown (`draining()` true), the user is told briefly (`RESTARTING`) and the
request is left "pending" for the next start; any other cancellation simply propagates. The caller holds the
user's slot (`bot.pipeline.limits.UserLimiter`) around the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import discord

from bot.discord_app.attachments import sent_as_spoiler
from bot.discord_app.replies import MessageReplySink, sibling_message
from bot.pipeline.services import Services
from storage import StorageError, StoredMessage

log = logging.getLogger(__name__)

RESTARTING = "I am restarting; your answer will appear here in a minute"
"""Shown in place of an answer cut off by a shutdown. The request stays "pending" and this message is its partial
reply: the next start answers it by editing this message (or, past `RESUME_WINDOW_S`, asks to ask again)."""
NOTICE_TIMEOUT_S = 5.0
"""Most time spent telling one user, at shutdown, that their answer was cut off."""


async def answer_in_reply(message: discord.Message, stored: StoredMessage, services: Services, *,
                          draining: Callable[[], bool], recovered: bool = False, note: str = "") -> None:
    """Answer `stored` in a reply to `message`; `note` (files left out) shows above the answer.

    `recovered`: the request is an earlier run's, claimed as "failed" by the recovery (given back if cut off).
    """
    # An answer about a hidden picture would give it away: it is hidden too.
    sink = MessageReplySink.for_message(message, edit_interval_s=services.settings.stream_edit_interval_s,
                                        spoiler=sent_as_spoiler(message), note=note)
    conversation = services.conversation
    if stored.partial_reply_id is not None:
        # An earlier run began this answer (or said it was restarting) in that message: go on there.
        sink.continue_in(sibling_message(message, int(stored.partial_reply_id)))
    else:
        sink.on_first_sent = lambda reply_id: conversation.note_partial_reply(stored, reply_id)
    try:
        async with sink:
            await conversation.respond(stored, sink)
    except asyncio.CancelledError:
        if draining():
            await _cut_off(stored, sink, services, recovered=recovered)
        raise


async def _cut_off(stored: StoredMessage, sink: MessageReplySink, services: Services, *, recovered: bool) -> None:
    """A shutdown cancelled this answer: tell the user, and leave the request "pending" for the next start."""
    log.info("request %s cut off by shutdown: left pending", stored.platform_id)
    try:
        await asyncio.wait_for(sink.failed(RESTARTING), NOTICE_TIMEOUT_S)
    except (TimeoutError, discord.HTTPException):
        log.info("request %s: restart notice not delivered", stored.platform_id)
    if recovered:  # claimed as "failed" by the recovery: give it back
        try:
            await services.conversation.store.claim_request(stored.platform_id, "pending", expected="failed")
        except StorageError:
            log.warning("request %s left failed", stored.platform_id)
