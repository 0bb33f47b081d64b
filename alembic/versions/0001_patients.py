"""Keyring table and a plaintext patients table.

Revision ID: 0001
Revises:
Create Date: 2024-06-01 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import sqlalchemy_envelope.alembic  # noqa: F401  (registers op.create_keyring_table)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_keyring_table()
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("ssn", sa.String(length=11), nullable=True),
        sa.Column("city", sa.String(length=100), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
        sa.UniqueConstraint("ssn", name="uq_patients_ssn"),
    )


def downgrade() -> None:
    op.drop_table("patients")
    op.drop_keyring_table()
