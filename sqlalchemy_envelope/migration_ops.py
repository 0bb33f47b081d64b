"""The Alembic operations: the keyring table and in-place column conversions.

Imported by :mod:`sqlalchemy_envelope.alembic`, whose docstring shows their
use. The batch operations commit once per batch (after committing the
migration's transaction, in Alembic's ``autocommit_block()``), work on
connections of their own from the migration connection's engine, and refuse
offline (``--sql``) mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations
from alembic.runtime.migration import MigrationContext

from . import jobs
from .column import Encrypted
from .envelope import METADATA_KEY, Envelope
from .errors import ConfigurationError
from .keyring import keyring_table

DEFAULT_TABLE = "envelope_data_keys"


def find_envelope(context: MigrationContext, envelope: Envelope | None = None) -> Envelope:
    """``envelope``, or the one registered on the migration's ``target_metadata``."""
    if envelope is not None:
        if not isinstance(envelope, Envelope):
            raise TypeError(f"envelope must be an Envelope, not {type(envelope).__name__}")
        return envelope
    found = registered_envelope(context)
    if found is None:
        raise ConfigurationError(
            "no Envelope for this migration: in env.py pass the metadata of your models "
            "(on which Envelope(metadata) registered itself) as context.configure("
            "target_metadata=...), or pass envelope= to the operation"
        )
    return found


def _configured(envelope: Envelope) -> Envelope:
    try:
        _ = envelope.kms
    except ConfigurationError:
        raise ConfigurationError(
            "the envelope has no KMS yet: configure it in env.py before running migrations, "
            "envelope.configure(kms=..., engine=connection.engine)"
        ) from None
    return envelope


def registered_envelope(context: MigrationContext) -> Envelope | None:
    target = context.opts.get("target_metadata")
    metadatas = target if isinstance(target, Sequence) else [target]
    for metadata in metadatas:
        if isinstance(metadata, sa.MetaData) and METADATA_KEY in metadata.info:
            found = metadata.info[METADATA_KEY]
            assert isinstance(found, Envelope)
            return found
    return None


def _online(context: MigrationContext, name: str) -> None:
    if context.as_sql:
        raise ConfigurationError(
            f"op.{name} reads and rewrites every row, so it cannot run in offline (--sql) mode; "
            "run this migration against the database"
        )


# -- the keyring table ---------------------------------------------------------------------
class KeyringOp(MigrateOperation):
    def __init__(
        self,
        table_name: str | None = None,
        *,
        schema: str | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        self.table_name = table_name
        self.schema = schema
        self.envelope = envelope

    #: The operation's name in ``alembic check``'s list of changes.
    diff_name: ClassVar[str]

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.diff_name, self.schema, self.table_name or DEFAULT_TABLE)

    def table(self, context: MigrationContext) -> sa.Table:
        found = self.envelope or registered_envelope(context)
        name = self.table_name or (found.table.name if found is not None else DEFAULT_TABLE)
        # The application's naming convention, so constraint names match its models.
        naming = found.table.metadata.naming_convention if found is not None else None
        return keyring_table(sa.MetaData(schema=self.schema, naming_convention=naming), name)


@Operations.register_operation("create_keyring_table")
class CreateKeyringTableOp(KeyringOp):
    """Create the envelope's keyring table (pure DDL: works in offline mode too)."""

    diff_name = "create_keyring_table"

    @classmethod
    def create_keyring_table(
        cls,
        operations: Operations,
        table_name: str | None = None,
        *,
        schema: str | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        """Create the keyring table: ``envelope``'s (or ``target_metadata``'s), else the default."""
        operations.invoke(cls(table_name, schema=schema, envelope=envelope))

    def reverse(self) -> DropKeyringTableOp:
        return DropKeyringTableOp(self.table_name, schema=self.schema, envelope=self.envelope)


@Operations.register_operation("drop_keyring_table")
class DropKeyringTableOp(KeyringOp):
    """Drop the keyring table and every data key in it: encrypted values become unreadable."""

    diff_name = "drop_keyring_table"

    @classmethod
    def drop_keyring_table(
        cls,
        operations: Operations,
        table_name: str | None = None,
        *,
        schema: str | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        """Drop the keyring table. Every value encrypted under its keys becomes unreadable."""
        operations.invoke(cls(table_name, schema=schema, envelope=envelope))

    def reverse(self) -> CreateKeyringTableOp:
        return CreateKeyringTableOp(self.table_name, schema=self.schema, envelope=self.envelope)


@Operations.implementation_for(CreateKeyringTableOp)
def _create_keyring_table(operations: Operations, op: CreateKeyringTableOp) -> None:
    context = operations.get_context()
    context.impl.create_table(op.table(context))


@Operations.implementation_for(DropKeyringTableOp)
def _drop_keyring_table(operations: Operations, op: DropKeyringTableOp) -> None:
    context = operations.get_context()
    context.impl.drop_table(op.table(context))


# -- column conversions --------------------------------------------------------------------
class ColumnOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        type_: Any = None,
        *,
        batch_size: int = 1000,
        schema: str | None = None,
        envelope: Envelope | None = None,
        scope: str | None = None,
        keep_ciphertext: bool = False,
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.type_ = type_
        self.batch_size = batch_size
        self.schema = schema
        self.envelope = envelope
        self.scope = scope  # decrypt_column's
        self.keep_ciphertext = keep_ciphertext  # encrypt_column's

    #: The operation's name in ``alembic check``'s list of changes.
    diff_name: ClassVar[str]

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.diff_name, self.schema, self.table_name, self.column_name, self.type_)


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(ColumnOp):
    """Encrypt an existing plaintext column in place (see :func:`jobs.encrypt_column`)."""

    diff_name = "encrypt_column"

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: Encrypted,
        *,
        batch_size: int = 1000,
        schema: str | None = None,
        envelope: Envelope | None = None,
        keep_ciphertext: bool = False,
    ) -> None:
        """Turn a plaintext column into ``type_`` (an ``Encrypted(...)``), in place.

        Commits the migration's transaction first, then once per batch of
        ``batch_size`` rows; rerun after an interruption, it finishes the job
        (no value lost, none encrypted twice). Refuses offline (--sql) mode.
        ``keep_ciphertext``: see :func:`sqlalchemy_envelope.jobs.encrypt_column`.
        """
        if not isinstance(type_, Encrypted):
            raise TypeError("op.encrypt_column needs the target Encrypted(...) type")
        operations.invoke(
            cls(
                table_name,
                column_name,
                type_,
                batch_size=batch_size,
                schema=schema,
                envelope=envelope,
                keep_ciphertext=keep_ciphertext,
            )
        )

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(
            self.table_name,
            self.column_name,
            self.type_.inner_type,
            batch_size=self.batch_size,
            schema=self.schema,
            envelope=self.envelope,
            scope=self.type_.scope or self.table_name,
        )


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(ColumnOp):
    """Restore an encrypted column to plaintext in place (see :func:`jobs.decrypt_column`)."""

    diff_name = "decrypt_column"

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (*super().to_diff_tuple(), self.scope)

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: Any,
        *,
        batch_size: int = 1000,
        schema: str | None = None,
        envelope: Envelope | None = None,
        scope: str | None = None,
    ) -> None:
        """Turn an encrypted column back into plaintext of type ``type_`` (for downgrades).

        Values are read under ``scope``'s keys: by default the scope the models
        declare for the column, else the table's. Commits the migration's
        transaction first, then once per batch; resumable like
        ``encrypt_column``. Refuses offline (--sql) mode.
        """
        operations.invoke(
            cls(
                table_name,
                column_name,
                type_,
                batch_size=batch_size,
                schema=schema,
                envelope=envelope,
                scope=scope,
            )
        )


@Operations.register_operation("reencrypt_column")
class ReencryptColumnOp(ColumnOp):
    """Move a column's values to its scope's active key (see :func:`jobs.reencrypt`)."""

    diff_name = "reencrypt_column"

    @classmethod
    def reencrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        batch_size: int = 1000,
        schema: str | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        """Re-encrypt every value of the column not under its scope's active key.

        Commits the migration's transaction first, then once per batch;
        resumable, and safe beside live traffic. Refuses offline (--sql) mode.
        """
        operations.invoke(
            cls(table_name, column_name, batch_size=batch_size, schema=schema, envelope=envelope)
        )


@contextmanager
def _batch_job(
    operations: Operations, name: str, envelope: Envelope | None
) -> Iterator[tuple[Envelope, sa.Engine]]:
    """The envelope and engine of a batch operation, outside the migration's transaction."""
    context = operations.get_context()
    _online(context, name)
    found = _configured(find_envelope(context, envelope))
    with context.autocommit_block():
        yield found, _engine(context)


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, op: EncryptColumnOp) -> None:
    with _batch_job(operations, "encrypt_column", op.envelope) as (envelope, engine):
        jobs.encrypt_column(
            envelope, engine, op.table_name, op.column_name, op.type_,
            batch_size=op.batch_size, schema=op.schema, keep_ciphertext=op.keep_ciphertext,
        )  # fmt: skip


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> None:
    with _batch_job(operations, "decrypt_column", op.envelope) as (envelope, engine):
        jobs.decrypt_column(
            envelope, engine, op.table_name, op.column_name, op.type_,
            batch_size=op.batch_size, schema=op.schema, scope=op.scope,
        )  # fmt: skip


@Operations.implementation_for(ReencryptColumnOp)
def _reencrypt_column(operations: Operations, op: ReencryptColumnOp) -> None:
    with _batch_job(operations, "reencrypt_column", op.envelope) as (envelope, engine):
        jobs.reencrypt_column(
            envelope, engine, op.table_name, op.column_name,
            batch_size=op.batch_size, schema=op.schema,
        )  # fmt: skip


def _engine(context: MigrationContext) -> sa.Engine:
    assert context.connection is not None
    return context.connection.engine
