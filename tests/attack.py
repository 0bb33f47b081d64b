"""Shared pieces of the attack tests: a populated database and raw access to stored values."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import LocalKms
from sqlalchemy_envelope.kms.base import GeneratedKey, KeyProvider

from .models import App, Color

WHEN = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
ALICE = {
    "name": "Alice Tamperproof",
    "email": "alice@tamper.example",
    "ssn": "123-45-6789",
    "notes": {"allergy": ["nuts"]},
}
BOB = {
    "name": "Bob Otherrow",
    "email": "bob@tamper.example",
    "ssn": "987-65-4321",
    "notes": {"x": 1},
}


class Db:
    """A populated database and raw access to its stored values."""

    def __init__(self, app: App, engine: sa.Engine) -> None:
        self.app = app
        self.engine = engine

    def raw(self, table: str, column: str, row_id: Any = None) -> bytes:
        t = self._raw_table(table, column)
        with self.engine.connect() as conn:
            return bytes(conn.execute(self._one(t, sa.select(t.c[column]), row_id)).scalar_one())

    def put(self, table: str, column: str, value: bytes, row_id: Any = None) -> None:
        t = self._raw_table(table, column)
        with self.engine.begin() as conn:
            assert (
                conn.execute(self._one(t, sa.update(t).values({column: value}), row_id)).rowcount
                == 1
            )

    def read(self, table: str, column: str, row_id: Any = None) -> Any:
        """The column's value through the Encrypted type, as the application reads it."""
        t = self.app.Base.metadata.tables[table]
        with self.engine.connect() as conn:
            return conn.execute(self._one(t, sa.select(t.c[column]), row_id)).scalar_one()

    def read_orm(self, row_id: int) -> dict[str, Any]:
        with Session(self.engine) as s:
            p = s.get(self.app.Patient, row_id)
            assert p is not None
            return {"name": p.name, "email": p.email, "ssn": p.ssn, "notes": p.notes}

    @staticmethod
    def _one(t: Any, stmt: Any, row_id: Any) -> Any:
        """Row ``row_id``; by default row 1 (patients, doctors) or the only row (visits)."""
        if t.name == "visits" and row_id is None:
            return stmt
        return stmt.where(t.c.id == (1 if row_id is None else row_id))

    def _raw_table(self, table: str, column: str) -> sa.TableClause:
        id_type = self.app.Base.metadata.tables[table].c.id.type
        return sa.table(table, sa.column("id", id_type), sa.column(column, sa.LargeBinary))


def populate(app: App, engine: sa.Engine) -> None:
    with Session(engine) as s:
        alice = app.Patient(id=1, **ALICE)
        alice.visits.append(
            app.Visit(reason="checkup", at=WHEN, fee=decimal.Decimal("12.50"), color=Color.RED)
        )
        s.add_all([alice, app.Patient(id=2, **BOB), app.Doctor(id=1, name="Dr. Stored")])
        s.commit()


def outcome(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:  # the test asserts on the type
        return exc


# -- a KMS that can be switched off: a fake in front of the real LocalKms -------------------
class SwitchableKms:
    """LocalKms that raises ``failure`` on every call while it is set."""

    def __init__(self, inner: LocalKms) -> None:
        self.inner = inner
        self.failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"SwitchableKms({self.inner!r})"

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        self._check()
        return self.inner.generate_data_key(context)

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        self._check()
        return self.inner.wrap(plaintext, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        self._check()
        return self.inner.unwrap(wrapped, context, kms_key_id)

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        self._check()
        return self.inner.rewrap_from(source, wrapped, context, kms_key_id)

    def owns(self, kms_key_id: str) -> bool:
        return self.inner.owns(kms_key_id)
