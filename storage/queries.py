"""Statement builders shared by the store and by the tests that inspect their query plans."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar, TypeVarTuple

from sqlalchemy import BindParameter, Integer, Select, String, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload

from storage.models import Channel, Image, Message, MessageImage

# SQLite allows 32766 bound parameters per statement, older builds 999: stay well under both.
CHUNK = 500

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def window_statement(
    channel_key: str | BindParameter[str],
    limit: int | BindParameter[int],
    before_id: int | BindParameter[int] | None = None,
) -> Select[Message]:
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


_WINDOW_COLUMNS = (Message.id, Message.platform_id, Message.role, Message.author_id, Message.author_name,
                   Message.text, Message.created_at, Message.reply_to, Message.request_state)
"""A window's columns, in the order `storage.rows.window` unpacks them."""


@functools.cache
def window_rows_statement(before: bool = False) -> Select[*tuple[Any, ...]]:
    """`window_statement` as the store runs it: plain columns, in the order `storage.rows.window` unpacks
    them, with `channel_key`, `limit` and (with `before`) `before_id` bound when executing it.

    Built once per shape, since building it costs more than running it; and plain columns, since this runs for
    every message and building ORM objects costs more than reading the rows.
    """
    return window_statement(
        bindparam("channel_key", type_=String), bindparam("limit", type_=Integer),
        bindparam("before_id", type_=Integer) if before else None,
    ).with_only_columns(*_WINDOW_COLUMNS)


@functools.cache
def window_with_images_statement(before: bool = False) -> Select[*tuple[Any, ...]]:
    """`window_rows_statement` with each message's images, in one statement (one round trip for the window,
    which is read for every message): a row per image, or one with empty image columns for a message without.

    The columns come in the order `storage.rows.window` unpacks them; bind as for `window_rows_statement`.
    No ORDER BY: the caller orders rows by message id and image position, so the database sorts nothing. The
    window is a subquery and the links and images are LEFT joined to it, which fixes the order of the joins:
    every database reads the window's rows by index, then the links' primary key (`message_id, position`) for
    those messages, then each image by its key, however many links and images it holds.
    """
    return _joined_with_images(window_rows_statement(before).subquery("window"))


@functools.cache
def late_answers_statement() -> Select[*tuple[Any, ...]]:
    """The answers stored after message `after_id` of channel `channel_key` to the requests `request_ids` (a
    list, bound expanded), with their images, in `window_with_images_statement`'s columns.

    A request's window ends at the request, but an answer is stored when it finishes: the answer to the request
    before it can come after it by id (it was being generated while this one waited), and belongs in its history.
    Found through the `reply_to` index, one look-up per request of the window, however busy the channel was since.
    """
    channel_id = select(Channel.id).where(Channel.key == bindparam("channel_key", type_=String)).scalar_subquery()
    answers = (
        select(*_WINDOW_COLUMNS)
        .where(
            Message.reply_to.in_(bindparam("request_ids", expanding=True, type_=String)),
            Message.channel_id == channel_id,
            Message.id > bindparam("after_id", type_=Integer),
            Message.role == "assistant",
        )
        .subquery("answers")
    )
    return _joined_with_images(answers)


def _joined_with_images(rows: Any) -> Select[*tuple[Any, ...]]:
    """`rows` (a subquery of `_WINDOW_COLUMNS`) with each message's images LEFT joined, a row per image."""
    return (
        select(rows, MessageImage.position, Image.sha256, Image.mime, Image.width, Image.height, Image.data)
        .select_from(rows)
        .outerjoin(MessageImage, MessageImage.message_id == rows.c.id)
        .outerjoin(Image, Image.id == MessageImage.image_id)
    )


def with_images(statement: Select[*Ts]) -> Select[*Ts]:
    """Load the messages' images in one more query (links joined to images), never one per message."""
    return statement.options(selectinload(Message.image_links).joinedload(MessageImage.image))


MESSAGE_COLUMNS = ("platform_id", "channel_id", "role", "author_id", "author_name", "text", "created_at",
                   "reply_to", "request_state")
"""What `message_insert_statement` binds, each as `m_<column>`."""


@functools.cache
def message_insert_statement(dialect_name: str) -> Any:
    """INSERT of one message (nothing on a duplicate platform id), returning its id; bind `m_<column>` for each of
    `MESSAGE_COLUMNS`. Built once: this runs for every message, and building it costs more than running it."""
    table = Message.__table__
    return (
        insert_for(dialect_name, table)
        .values({name: bindparam(f"m_{name}", type_=table.c[name].type) for name in MESSAGE_COLUMNS})
        .on_conflict_do_nothing(index_elements=[table.c.platform_id])
        .returning(table.c.id)
    )


@functools.cache
def mark_answered_statement() -> Any:
    """Mark the request with platform id `answered` (bound) answered; built once, it runs for every answer."""
    table = Message.__table__
    assert isinstance(table, Table)  # a mapped class's __table__ is typed as any FromClause
    return (update(table).where(table.c.platform_id == bindparam("answered", type_=String))
            .values(request_state="answered"))


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
