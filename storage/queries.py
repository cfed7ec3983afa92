"""Statement builders shared by the store and by the tests that inspect their query plans."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import BindParameter, Integer, Select, String, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload

from storage.models import Channel, Image, Message, MessageImage

# SQLite allows 32766 bound parameters per statement, older builds 999: stay well under both.
CHUNK = 500

T = TypeVar("T")


def window_statement(
    channel_key: str | BindParameter[str],
    limit: int | BindParameter[int],
    before_id: int | BindParameter[int] | None = None,
) -> Select[tuple[Message]]:
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


@functools.cache
def window_rows_statement(before: bool = False) -> Select[Any]:
    """`window_statement` as the store runs it: plain columns, in the order `storage.store._window` unpacks
    them, with `channel_key`, `limit` and (with `before`) `before_id` bound when executing it.

    Built once per shape, since building it costs more than running it; and plain columns, since this runs for
    every message and building ORM objects costs more than reading the rows.
    """
    return window_statement(
        bindparam("channel_key", type_=String), bindparam("limit", type_=Integer),
        bindparam("before_id", type_=Integer) if before else None,
    ).with_only_columns(
        Message.id, Message.platform_id, Message.role, Message.author_id, Message.author_name, Message.text,
        Message.created_at, Message.reply_to, Message.request_state,
    )


@functools.cache
def window_images_statement() -> Select[Any]:
    """The images of some messages (bind `message_ids`, at most `CHUNK` of them), as plain columns in the order
    `storage.store._window` unpacks them; in no stated order (the caller sorts by position).

    Looked up by message id in a statement of its own, not joined to the window, and the images joined with a
    LEFT join (every link has its image, so the rows are the same): both fix the order, links first, so every
    database reads the links' primary key (`message_id, position`) for these messages, then each image by its
    key. Otherwise PostgreSQL's planner may start from the images, or hash-join a scan of all links, and
    read every link of a picture posted many times.
    """
    return (
        select(MessageImage.message_id, MessageImage.position, Image.sha256, Image.mime, Image.width,
               Image.height, Image.data)
        .outerjoin(Image, Image.id == MessageImage.image_id)
        .where(MessageImage.message_id.in_(bindparam("message_ids", expanding=True)))
    )


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
