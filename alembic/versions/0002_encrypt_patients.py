"""Encrypt patients.name and patients.ssn in place.

Each op.encrypt_column commits the migration's transaction, then once per
batch; if it is interrupted, run the upgrade again: it resumes.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-02 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import sqlalchemy_envelope.alembic  # noqa: F401  (registers op.encrypt_column & co.)
from sqlalchemy_envelope import Encrypted

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No envelope argument: the operations use the one env.py configured.
    op.encrypt_column("patients", "name", Encrypted(sa.String(200)))
    op.encrypt_column("patients", "ssn", Encrypted(sa.String(11), deterministic=True))


def downgrade() -> None:
    op.decrypt_column("patients", "ssn", sa.String(11))
    op.decrypt_column("patients", "name", sa.String(200))
