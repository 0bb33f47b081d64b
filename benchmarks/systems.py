"""The systems compared: one table and one ORM class each, identical but for the column type.

Every table has an integer primary key and two string columns, ``name`` and
``email``, with an index on ``email`` (so the equality lookup is an index
probe, and every system pays for the same index on insert).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine, FernetEngine

from sqlalchemy_envelope import Encrypted, Envelope

TypePair = tuple[sa.types.TypeEngine[Any], sa.types.TypeEngine[Any]]


@dataclass(frozen=True)
class System:
    key: str
    label: str
    #: Can SQL find a row by ``email == value``?
    lookup: bool
    types: Callable[[Envelope, str], TypePair]


def _plain(envelope: Envelope, secret: str) -> TypePair:
    return sa.String(200), sa.String(320)


def _encrypted(envelope: Envelope, secret: str) -> TypePair:
    return Encrypted(sa.String(200), envelope), Encrypted(sa.String(320), envelope)


def _deterministic(envelope: Envelope, secret: str) -> TypePair:
    return (
        Encrypted(sa.String(200), envelope, deterministic=True),
        Encrypted(sa.String(320), envelope, deterministic=True),
    )


def _utils(engine: type[Any]) -> Callable[[Envelope, str], TypePair]:
    def types(envelope: Envelope, secret: str) -> TypePair:
        return (
            StringEncryptedType(sa.String, secret, engine),
            StringEncryptedType(sa.String, secret, engine),
        )

    return types


SYSTEMS: tuple[System, ...] = (
    System("plaintext", "plaintext", True, _plain),
    System("encrypted", "Encrypted (randomized)", False, _encrypted),
    System("deterministic", "Encrypted (deterministic)", True, _deterministic),
    System("utils_aesgcm", "sqlalchemy-utils AesGcmEngine", False, _utils(AesGcmEngine)),
    System("utils_fernet", "sqlalchemy-utils FernetEngine", False, _utils(FernetEngine)),
)


@dataclass
class Schema:
    """The tables, ORM classes and envelope of one database."""

    metadata: sa.MetaData
    envelope: Envelope
    tables: dict[str, sa.Table]
    models: dict[str, type[Any]]


def build_schema(systems: tuple[System, ...] = SYSTEMS) -> Schema:
    md = sa.MetaData()
    envelope = Envelope(md)
    secret = os.urandom(32).hex()

    class Base(DeclarativeBase):
        metadata = md

    tables: dict[str, sa.Table] = {}
    models: dict[str, type[Any]] = {}
    for system in systems:
        name_type, email_type = system.types(envelope, secret)
        table = sa.Table(
            f"bench_{system.key}",
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", name_type),
            sa.Column("email", email_type, index=True),
        )
        tables[system.key] = table
        models[system.key] = type(f"Bench_{system.key}", (Base,), {"__table__": table})
    return Schema(md, envelope, tables, models)


def row_values(n: int, start: int = 0) -> list[dict[str, str]]:
    """``n`` rows of realistic short strings (about 20 characters each)."""
    return [
        {"name": f"Patient {i:07d} Example", "email": f"user{i:07d}@example.org"}
        for i in range(start, start + n)
    ]
