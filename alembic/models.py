"""The sample application's models: what the database looks like after the last migration.

In your project, env.py imports your own models module instead.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import Encrypted, Envelope

# Named constraints keep autogenerate and the column conversions stable.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


# Registers itself on Base.metadata: the migrations' operations find it there.
envelope = Envelope(Base.metadata)


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Encrypted(sa.String(200), envelope))
    # Deterministic, so it can stay unique and be looked up by value; it reveals
    # which rows share an SSN (none, here).
    ssn: Mapped[str | None] = mapped_column(
        Encrypted(sa.String(11), envelope, deterministic=True), unique=True
    )
    city: Mapped[str | None] = mapped_column(sa.String(100))
    created_at: Mapped[dt.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
