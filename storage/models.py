"""The ORM tables: channels, messages, images and the links between messages and images.

Schema changes go through Alembic (`storage/migrations/versions/`); a test checks that the migrations
produce exactly these tables. Relationships load with `lazy="raise"` so that no attribute access can
start hidden I/O: every query states what it loads.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Fixed constraint names, so that migrations can refer to them and every backend names them the same.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out timezone-aware in UTC.

    SQLite has no time zone type and hands back naive values; storing UTC and re-attaching the zone on
    the way out keeps comparisons (e.g. `created_at >= since`) right on every backend.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage only accepts timezone-aware values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Channel(Base):
    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    """The platform's channel id as text, or "console"."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)

    # Per-channel settings; NULL means "use the bot's default" (validated in `channel_settings.py`).
    answer_mode: Mapped[str | None] = mapped_column(String(16))
    record_mode: Mapped[str | None] = mapped_column(String(16))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    max_new_tokens: Mapped[int | None] = mapped_column(Integer)
    temperature: Mapped[float | None] = mapped_column(Float)
    decoding: Mapped[str | None] = mapped_column(String(16))


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # The window query: WHERE channel_id = ? [AND id < ?] ORDER BY id DESC LIMIT ?, served by one
        # index range read whatever the channel's total history.
        Index("ix_messages_channel_id_id", "channel_id", "id"),
        Index("ix_messages_author_id", "author_id"),  # forget_user
        Index("ix_messages_reply_to", "reply_to"),  # forget_user: assistant answers to a user's messages
        Index("ix_messages_request_state", "request_state"),  # crash recovery: the few still "pending"
        # Never reuse an id once deleted: ids order the history and `before_id` refers to them.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    platform_id: Mapped[str] = mapped_column(String(64), unique=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    author_id: Mapped[str] = mapped_column(String(64))
    author_name: Mapped[str] = mapped_column(String(256))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    reply_to: Mapped[str | None] = mapped_column(String(64))
    request_state: Mapped[str | None] = mapped_column(String(16))
    partial_reply_id: Mapped[str | None] = mapped_column(String(64))
    """A request's: platform id of the message showing its answer while it is delivered (set once sent), so that
    a restart continues in that message rather than leave it cut off beside a new one."""

    image_links: Mapped[list[MessageImage]] = relationship(
        order_by="MessageImage.position", lazy="raise", passive_deletes=True
    )


class Image(Base):
    """One row per distinct content: the same picture posted twice is stored once."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    mime: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    byte_size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class MessageImage(Base):
    __tablename__ = "message_images"
    __table_args__ = (
        # Orphan clean-up asks "is this image still linked anywhere?": needs an index on image_id.
        Index("ix_message_images_image_id", "image_id"),
    )

    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No cascade here: an image is removed only by the orphan clean-up, never from under a message.
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))

    image: Mapped[Image] = relationship(lazy="raise")


__all__ = ["Base", "Channel", "Image", "Message", "MessageImage", "UtcDateTime"]
