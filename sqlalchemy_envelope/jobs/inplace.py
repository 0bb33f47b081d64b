"""Convert a column in place: plaintext to encrypted (``encrypt_column``) and back.

Both read every value through the column's *application* type (so a Decimal
keeps its digits, a date stays a date, JSON stays JSON) and write it through
the target type, into a shadow column that is swapped in at the end; see
:mod:`sqlalchemy_envelope.jobs.conversion` for how an interrupted run resumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..column import Encrypted
from .batches import Progress, naming_missing_tables
from .conversion import DECRYPTING, ENCRYPTING, Conversion, abandon
from .reports import ColumnJobReport, ReencryptReport

if TYPE_CHECKING:
    from ..envelope import Envelope

__all__ = ["abandon_conversion", "decrypt_column", "encrypt_column", "reencrypt_column"]


@naming_missing_tables
def encrypt_column(
    envelope: Envelope,
    bind: Engine | Connection,
    table_name: str,
    column_name: str,
    type_: Encrypted,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    schema: str | None = None,
    distributed: bool = False,
    chunk_rows: int | None = None,
    lease: float = 120.0,
    keep_ciphertext: bool = False,
) -> ColumnJobReport:
    """Encrypt an existing plaintext column in place, committing once per batch.

    ``type_`` is the target ``Encrypted(...)`` type (its envelope may be
    omitted); the plaintext is read through its inner type, which should be
    the type the application declared for the column. Resumable: rerun after
    a crash at any point finishes the job, and a rerun after success does
    nothing. The application may keep writing to the column while the
    shadow fills: inserted rows are converted before the swap, and rows
    updated after their batch are converted again (a trigger clears their
    shadow, see :mod:`sqlalchemy_envelope.jobs.trigger`). Switch its code at
    the swap: the old code writes plaintext, the new code ciphertext.
    ``distributed=True`` shares the filling among several workers, and an
    Engine on PostgreSQL fills on two connections at once, as for
    :func:`sqlalchemy_envelope.jobs.reencrypt`.

    A value that is already this column's ciphertext (written by code declaring
    the column ``Encrypted`` before the swap, or copied from another row) stops
    the job, naming its row: ``keep_ciphertext=True`` copies such values as
    they are, for an operator who knows only their own code wrote them (see
    :mod:`sqlalchemy_envelope.jobs.early`). A binary column that holds its
    ciphertext beside other values is refused before anything changes, and
    converted so with ``keep_ciphertext=True``: the type is the same before
    and after, so it may also be a finished conversion with plaintext
    written around it since.
    """
    if not isinstance(type_, Encrypted):
        raise TypeError("encrypt_column needs the target Encrypted(...) type")
    bound = type_.for_column(table_name, column_name, envelope)
    bound.crypter()  # ConfigurationError now if the envelope is missing
    job = Conversion(
        table_name, column_name, schema, ENCRYPTING,
        read=bound.inner_type, write=bound, shadow_type=_Stored(bound),
        keep_ciphertext=keep_ciphertext,
    )  # fmt: skip
    return job.run(
        envelope, bind, batch_size, progress, distributed, chunk_rows, lease,
        warm=lambda: _warm(bound),
    )  # fmt: skip


@naming_missing_tables
def decrypt_column(
    envelope: Envelope,
    bind: Engine | Connection,
    table_name: str,
    column_name: str,
    type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]],
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    schema: str | None = None,
    distributed: bool = False,
    chunk_rows: int | None = None,
    lease: float = 120.0,
    scope: str | None = None,
) -> ColumnJobReport:
    """The inverse of :func:`encrypt_column`: restore the plaintext column of type ``type_``.

    Values are read under ``scope``'s keys: by default the scope the envelope's
    models declare for the column, else the table's. Pass the old scope to
    convert a column whose models declare a new one, or no longer declare it
    and it had a scope of its own; a column whose values are all another
    scope's is refused, naming that scope. Commits once per batch; resumable
    the same way.
    """
    plain = type_() if isinstance(type_, type) else type_
    if not isinstance(plain, sa.types.TypeEngine) or isinstance(plain, Encrypted):
        raise TypeError(
            "decrypt_column needs the plaintext type to restore, such as sa.String(200)"
        )
    # Values are read under one scope's keys only, never one the stored values choose.
    if scope is None:
        scope = envelope.columns.get((table_name, column_name))
    reader = Encrypted(plain, envelope, scope=scope).for_column(table_name, column_name)
    job = Conversion(
        table_name, column_name, schema, DECRYPTING, read=reader, write=plain, shadow_type=plain
    )
    return job.run(envelope, bind, batch_size, progress, distributed, chunk_rows, lease, warm=None)


@naming_missing_tables
def abandon_conversion(
    bind: Engine | Connection, table_name: str, column_name: str, *, schema: str | None = None
) -> list[str]:
    """Undo what an unfinished ``encrypt_column`` or ``decrypt_column`` left behind.

    Drops the shadow column (``<column>__envelope`` or ``__envelope_plain``)
    and the trigger that goes with it; the column itself, which the
    conversion never touches before its swap, is left as it is. Returns the
    names of the shadows dropped (none if there was nothing to undo). Use it
    when a conversion cannot finish as written (a ``decrypt_column`` type too
    narrow for the values, say), then run the corrected one.
    """
    return abandon(bind, table_name, column_name, schema)


@naming_missing_tables
def reencrypt_column(
    envelope: Envelope,
    bind: Engine | Connection,
    table_name: str,
    column_name: str,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    schema: str | None = None,
    distributed: bool = False,
    chunk_rows: int | None = None,
    lease: float = 120.0,
) -> ReencryptReport:
    """Move one column's values to its scope's active key (see ``jobs.reencrypt``)."""
    from . import reencrypt

    return reencrypt(
        envelope, table_name, batch_size=batch_size, progress=progress, columns=[column_name],
        bind=bind, distributed=distributed, chunk_rows=chunk_rows, lease=lease, schema=schema,
    )  # fmt: skip


def _warm(bound: Encrypted) -> None:
    # Load the active key outside the batch's transaction (see batches.walk).
    bound.crypter().for_writing()


class _Stored(sa.types.TypeDecorator[Any]):
    """The binary type an ``Encrypted`` column is stored as, on whatever dialect compiles it."""

    impl = sa.LargeBinary
    cache_ok = True

    def __init__(self, encrypted: Encrypted) -> None:
        super().__init__()
        self.encrypted = encrypted

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        return self.encrypted.load_dialect_impl(dialect)
