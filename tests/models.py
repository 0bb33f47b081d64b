"""A small application schema for the tests, built fresh per test (one Envelope per metadata)."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sqlalchemy_envelope import Encrypted, Envelope


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class App:
    Base: Any
    envelope: Envelope
    Patient: Any
    Visit: Any
    Doctor: Any


def build(**envelope_options: Any) -> App:
    class Base(DeclarativeBase):
        pass

    envelope = Envelope(Base.metadata, **envelope_options)

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Encrypted(sa.String(200), envelope))
        email: Mapped[str] = mapped_column(
            Encrypted(sa.String(320), envelope, deterministic=True), unique=True
        )
        ssn: Mapped[str | None] = mapped_column(Encrypted(sa.String(11), envelope))
        notes: Mapped[dict[str, Any] | None] = mapped_column(Encrypted(sa.JSON, envelope))
        visits: Mapped[list[Visit]] = relationship(back_populates="patient", lazy="selectin")

    class Visit(Base):
        __tablename__ = "visits"
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
        reason: Mapped[str] = mapped_column(Encrypted(sa.Text, envelope))
        at: Mapped[dt.datetime] = mapped_column(Encrypted(sa.DateTime(timezone=True), envelope))
        fee: Mapped[decimal.Decimal | None] = mapped_column(Encrypted(sa.Numeric(10, 2), envelope))
        color: Mapped[Color | None] = mapped_column(Encrypted(sa.Enum(Color), envelope))
        patient: Mapped[Patient] = relationship(back_populates="visits")

    class Doctor(Base):
        __tablename__ = "doctors"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Encrypted(sa.String(100), envelope, scope="staff"))
        plain: Mapped[str | None] = mapped_column(sa.String(50))

    return App(Base, envelope, Patient, Visit, Doctor)
