"""URL tokens are redacted from every record the installed record factory makes, whatever logs them."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from bot.ops.logging_setup import REDACTED, install_log_redaction, redact_url_tokens, uninstall_log_redaction

INTERACTION = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OTpBQkNERUZHSElKS0xNTk9Q.x-y_z"


@pytest.fixture
def redaction() -> Iterator[None]:
    install_log_redaction(["bot-token"])
    try:
        yield
    finally:
        uninstall_log_redaction()


def test_the_token_segment_of_interaction_and_webhook_urls_is_replaced() -> None:
    base = "https://discord.com/api/v10"
    assert redact_url_tokens(f"POST {base}/interactions/123/{INTERACTION}/callback with x") == \
        f"POST {base}/interactions/123/{REDACTED}/callback with x"
    assert redact_url_tokens(f"PATCH {base}/webhooks/42/{INTERACTION}/messages/@original?wait=1") == \
        f"PATCH {base}/webhooks/42/{REDACTED}/messages/@original?wait=1"
    assert redact_url_tokens(f"'{base}/webhooks/42/{INTERACTION}'") == f"'{base}/webhooks/42/{REDACTED}'"
    # Ids and other routes stay readable.
    assert redact_url_tokens(f"GET {base}/channels/123/messages/456") == f"GET {base}/channels/123/messages/456"


def test_any_logger_at_any_level(redaction: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"https://discord.com/api/v10/webhooks/42/{INTERACTION}/messages/1"
    logging.getLogger("discord.webhook.async_").debug("Webhook ID %s with %s %s has returned status code %s",
                                                      42, "PATCH", url, 200)
    logging.getLogger("aiohttp.client").warning("failed: %r", url)
    try:
        raise RuntimeError(f"cannot reach {url}")
    except RuntimeError:
        logging.getLogger("somewhere").exception("oops")
    lines = [logging.Formatter().format(r) for r in caplog.records]
    assert len(lines) == 3
    assert all(INTERACTION not in line and REDACTED in line for line in lines), lines
