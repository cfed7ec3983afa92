"""Statement builders shared by the store and by the tests that inspect their query plans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload

from storage.models import Channel, Message, MessageImage

# SQLite allows 32766 bound parameters per statement, older builds 999: stay well under both.
CHUNK = 500

T = TypeVar("T")


def window_statement(channel_key: str, limit: int, before_id: int | None = None) -> Select[tuple[Message]]:
    """The last `limit` messages of a channel, newest first.

    The channel id comes from a scalar subquery rather than a join so that the planner sees
    `channel_id = <constant>`: then `ORDER BY id DESC LIMIT n` walks the (channel_id, id) index backwards
    and stops after n rows, with no sort, whatever the length of the history.
    """
    channel_id = select(Channel.id).where(Channel.key == channel_key).scalar_subquery()
    statement = select(Message).where(Message.channel_id == channel_id)
    if before_id is not None:
        statement = statement.where(Message.id < before_id)
    return statement.order_by(Message.id.desc()).limit(limit)


def with_images(statement: Select[Any]) -> Select[Any]:
    """Load the messages' images in one more query (links joined to images), never one per message."""
    return statement.options(selectinload(Message.image_links).joinedload(MessageImage.image))


def insert_for(dialect_name: str, table: Any) -> Any:
    """The dialect's INSERT, which has ON CONFLICT; the generic one does not."""
    if dialect_name == "sqlite":
        return sqlite.insert(table)
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"storage supports sqlite and postgresql, not {dialect_name}")


def chunks(items: Sequence[T], size: int = CHUNK) -> list[Sequence[T]]:
    """`items` cut into pieces small enough for one `IN (...)` each."""
    return [items[i : i + size] for i in range(0, len(items), size)]
