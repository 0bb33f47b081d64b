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

from .autogenerate import process_revision_directives, render_item
from .migration_ops import (
    CreateKeyringTableOp,
    DecryptColumnOp,
    DropKeyringTableOp,
    EncryptColumnOp,
    ReencryptColumnOp,
    find_envelope,
)

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
