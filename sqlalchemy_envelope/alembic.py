"""Alembic integration: ``import sqlalchemy_envelope.alembic`` registers the operations.

In a migration::

    import sqlalchemy_envelope.alembic  # noqa: F401  (registers op.encrypt_column & co.)
    from sqlalchemy_envelope import Encrypted

    def upgrade():
        op.encrypt_column("patients", "ssn", Encrypted(sa.String(11)))

    def downgrade():
        op.decrypt_column("patients", "ssn", sa.String(11))

The operations find the envelope in the ``target_metadata`` that ``env.py``
passes to ``context.configure`` (``Envelope(Base.metadata)`` registered itself
there), or take ``envelope=``. ``env.py`` configures it before running
migrations, normally on the migration's own engine::

    envelope.configure(kms=LocalKms.from_file("master.key"), engine=connection.engine)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_item=sqlalchemy_envelope.alembic.render_item,
        process_revision_directives=sqlalchemy_envelope.alembic.process_revision_directives,
    )

``render_item`` makes autogenerate render ``Encrypted(...)`` columns with
their import; ``process_revision_directives`` turns autogenerate's type
change of a plaintext column into ``op.encrypt_column`` (and
``op.decrypt_column`` in the downgrade), and the keyring table's
``create_table`` into ``op.create_keyring_table()``.

The batch operations (``encrypt_column``, ``decrypt_column``,
``reencrypt_column``) commit once per batch: they first commit the
migration's transaction (Alembic's ``autocommit_block()``), then work on
connections of their own from the migration connection's engine (so
settings made on the migration connection alone, such as ``SET
search_path``, belong in the engine's URL or a connect event). They refuse
offline (``--sql``) mode, since they read and write every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import sqlalchemy as sa
from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.rewriter import Rewriter
from alembic.operations import MigrateOperation, Operations, ops
from alembic.runtime.migration import MigrationContext

from . import jobs
from .column import Encrypted
from .envelope import METADATA_KEY, Envelope
from .errors import ConfigurationError
from .inplace import jobs_table_name
from .keyring import keyring_table

__all__ = [
    "CreateKeyringTableOp",
    "DecryptColumnOp",
    "DropKeyringTableOp",
    "EncryptColumnOp",
    "ReencryptColumnOp",
    "find_envelope",
    "process_revision_directives",
    "render_item",
]

DEFAULT_TABLE = "envelope_data_keys"


def find_envelope(context: MigrationContext, envelope: Envelope | None = None) -> Envelope:
    """``envelope``, or the one registered on the migration's ``target_metadata``."""
    if envelope is not None:
        if not isinstance(envelope, Envelope):
            raise TypeError(f"envelope must be an Envelope, not {type(envelope).__name__}")
        return envelope
    found = _registered(context)
    if found is None:
        raise ConfigurationError(
            "no Envelope for this migration: in env.py pass the metadata of your models "
            "(on which Envelope(metadata) registered itself) as context.configure("
            "target_metadata=...), or pass envelope= to the operation"
        )
    return found


def _registered(context: MigrationContext) -> Envelope | None:
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
class _KeyringOp(MigrateOperation):
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

    def table(self, context: MigrationContext) -> sa.Table:
        found = self.envelope or _registered(context)
        name = self.table_name or (found.table.name if found is not None else DEFAULT_TABLE)
        # The application's naming convention, so constraint names match its models.
        naming = found.table.metadata.naming_convention if found is not None else None
        return keyring_table(sa.MetaData(schema=self.schema, naming_convention=naming), name)


@Operations.register_operation("create_keyring_table")
class CreateKeyringTableOp(_KeyringOp):
    """Create the envelope's keyring table (pure DDL: works in offline mode too)."""

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
class DropKeyringTableOp(_KeyringOp):
    """Drop the keyring table and every data key in it: encrypted values become unreadable."""

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
class _ColumnOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        type_: Any = None,
        *,
        batch_size: int = 1000,
        schema: str | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.type_ = type_
        self.batch_size = batch_size
        self.schema = schema
        self.envelope = envelope


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnOp):
    """Encrypt an existing plaintext column in place (see :func:`jobs.encrypt_column`)."""

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
    ) -> None:
        """Turn a plaintext column into ``type_`` (an ``Encrypted(...)``), in place.

        Commits the migration's transaction first, then once per batch of
        ``batch_size`` rows; rerun after an interruption, it finishes the job
        (no value lost, none encrypted twice). Refuses offline (--sql) mode.
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
        )


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnOp):
    """Restore an encrypted column to plaintext in place (see :func:`jobs.decrypt_column`)."""

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
    ) -> None:
        """Turn an encrypted column back into plaintext of type ``type_`` (for downgrades).

        Commits the migration's transaction first, then once per batch;
        resumable like ``encrypt_column``. Refuses offline (--sql) mode.
        """
        operations.invoke(
            cls(
                table_name,
                column_name,
                type_,
                batch_size=batch_size,
                schema=schema,
                envelope=envelope,
            )
        )


@Operations.register_operation("reencrypt_column")
class ReencryptColumnOp(_ColumnOp):
    """Move a column's values to its scope's active key (see :func:`jobs.reencrypt`)."""

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


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, op: EncryptColumnOp) -> None:
    context = operations.get_context()
    _online(context, "encrypt_column")
    envelope = find_envelope(context, op.envelope)
    with context.autocommit_block():
        jobs.encrypt_column(
            envelope, _engine(context), op.table_name, op.column_name, op.type_,
            batch_size=op.batch_size, schema=op.schema,
        )  # fmt: skip


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> None:
    context = operations.get_context()
    _online(context, "decrypt_column")
    envelope = find_envelope(context, op.envelope)
    with context.autocommit_block():
        jobs.decrypt_column(
            envelope, _engine(context), op.table_name, op.column_name, op.type_,
            batch_size=op.batch_size, schema=op.schema,
        )  # fmt: skip


@Operations.implementation_for(ReencryptColumnOp)
def _reencrypt_column(operations: Operations, op: ReencryptColumnOp) -> None:
    context = operations.get_context()
    _online(context, "reencrypt_column")
    envelope = find_envelope(context, op.envelope)
    table: Any = op.table_name
    if op.schema is not None:
        table = sa.Table(op.table_name, sa.MetaData(), schema=op.schema)
    with context.autocommit_block():
        jobs.reencrypt(
            envelope,
            table,
            columns=[op.column_name],
            batch_size=op.batch_size,
            bind=_engine(context),
        )


def _engine(context: MigrationContext) -> sa.Engine:
    assert context.connection is not None
    return context.connection.engine


# -- autogenerate ----------------------------------------------------------------------------
def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """``render_item`` hook for env.py: renders ``Encrypted(...)`` with its import."""
    if type_ != "type" or not isinstance(obj, Encrypted):
        return False
    if autogen_context.imports is not None:
        autogen_context.imports.add("import sqlalchemy_envelope")
    return _render_encrypted(obj, autogen_context)


def _render_encrypted(obj: Encrypted, autogen_context: AutogenContext) -> str:
    try:
        from alembic.autogenerate.render import _repr_type

        inner = _repr_type(obj.inner_type, autogen_context)
    except ImportError:  # pragma: no cover - a future Alembic without the helper
        inner = f"sa.{obj.inner_type!r}"
    args = [inner]
    if obj.deterministic:
        args.append("deterministic=True")
    if obj.scope is not None:
        args.append(f"scope={obj.scope!r}")
    return f"sqlalchemy_envelope.Encrypted({', '.join(args)})"


def _render_args(op: _ColumnOp, autogen_context: AutogenContext, *extra: str) -> str:
    args = [repr(op.table_name), repr(op.column_name), *extra]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    return ", ".join(args)


def _needs_import(autogen_context: AutogenContext, *more: str) -> None:
    if autogen_context.imports is not None:
        autogen_context.imports.update(("import sqlalchemy_envelope.alembic", *more))


@renderers.dispatch_for(EncryptColumnOp)
def _render_encrypt_column(autogen_context: AutogenContext, op: EncryptColumnOp) -> str:
    _needs_import(autogen_context, "import sqlalchemy_envelope")
    rendered = _render_encrypted(op.type_, autogen_context)
    return f"op.encrypt_column({_render_args(op, autogen_context, rendered)})"


@renderers.dispatch_for(DecryptColumnOp)
def _render_decrypt_column(autogen_context: AutogenContext, op: DecryptColumnOp) -> str:
    from alembic.autogenerate.render import _repr_type

    _needs_import(autogen_context)
    rendered = _repr_type(op.type_, autogen_context)
    return f"op.decrypt_column({_render_args(op, autogen_context, rendered)})"


@renderers.dispatch_for(CreateKeyringTableOp)
def _render_create_keyring(autogen_context: AutogenContext, op: CreateKeyringTableOp) -> str:
    _needs_import(autogen_context)
    return f"op.create_keyring_table({_keyring_args(op)})"


@renderers.dispatch_for(DropKeyringTableOp)
def _render_drop_keyring(autogen_context: AutogenContext, op: DropKeyringTableOp) -> str:
    _needs_import(autogen_context)
    return f"op.drop_keyring_table({_keyring_args(op)})"


def _keyring_args(op: _KeyringOp) -> str:
    args = [] if op.table_name is None else [repr(op.table_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    return ", ".join(args)


process_revision_directives = Rewriter()
"""``process_revision_directives`` hook for env.py (an Alembic ``Rewriter``).

Autogenerate sees a plaintext column that the models now declare
``Encrypted`` as a type change; this turns it into ``op.encrypt_column`` (and
the downgrade's into ``op.decrypt_column``), and the keyring table's
``create_table`` / ``drop_table`` into ``op.create_keyring_table()`` /
``op.drop_keyring_table()``; it leaves out the batch jobs' own table
(``<keyring table>_jobs``), which distributed jobs create on demand. Chain it
with other rewriters via ``.chain()``.
"""


@process_revision_directives.rewrites(ops.AlterColumnOp)
def _convert_type_change(context: MigrationContext, revision: Any, op: ops.AlterColumnOp) -> Any:
    new, old = op.modify_type, op.existing_type
    if new is None or isinstance(new, Encrypted) == isinstance(old, Encrypted):
        return op
    if _other_changes(op):
        return op  # leave a combined change to the author
    if isinstance(new, Encrypted):
        return EncryptColumnOp(op.table_name, op.column_name, new, schema=op.schema)
    # The inner type the values were encoded with, which is what the column held before.
    plain = old.inner_type if isinstance(old, Encrypted) else new
    return DecryptColumnOp(op.table_name, op.column_name, plain, schema=op.schema)


def _other_changes(op: ops.AlterColumnOp) -> bool:
    kw = op.kw
    return any(
        value is not None
        for value in (
            op.modify_nullable,
            op.modify_server_default or None,
            op.modify_name,
            op.modify_comment or None,
            kw.get("modify_autoincrement"),
        )
    )


@process_revision_directives.rewrites(ops.CreateTableOp)
def _create_keyring(context: MigrationContext, revision: Any, op: ops.CreateTableOp) -> Any:
    envelope = _registered(context)
    if envelope is not None and op.table_name == envelope.table.name:
        return CreateKeyringTableOp(_custom_name(op.table_name), schema=op.schema)
    return op


@process_revision_directives.rewrites(ops.CreateIndexOp)
def _keyring_index(context: MigrationContext, revision: Any, op: ops.CreateIndexOp) -> Any:
    # create_keyring_table creates the keyring's indexes too.
    envelope = _registered(context)
    if envelope is None or op.table_name != envelope.table.name or context.connection is None:
        return op
    exists = sa.inspect(context.connection).has_table(op.table_name, schema=op.schema)
    return op if exists else []


@process_revision_directives.rewrites(ops.DropTableOp)
def _drop_keyring(context: MigrationContext, revision: Any, op: ops.DropTableOp) -> Any:
    envelope = _registered(context)
    if envelope is not None and op.table_name == envelope.table.name:
        return DropKeyringTableOp(_custom_name(op.table_name), schema=op.schema)
    if envelope is not None and op.table_name == jobs_table_name(envelope):
        return []  # the batch jobs' own table, created on demand: not the models' business
    return op


def _custom_name(name: str) -> str | None:
    return None if name == DEFAULT_TABLE else name
