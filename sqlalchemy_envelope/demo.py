"""The quickstart, shared by ``sqlalchemy-envelope demo`` and ``examples/quickstart.py``.

A small model with encrypted columns, two patients stored through the ORM on
a SQLite file under a local master key, and three views of the result: what
the application reads, what the database holds, and the keyring. Then a key
rotation, after which old rows stay readable. Nothing here needs more than
``pip install sqlalchemy-envelope``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import wire
from .column import Encrypted
from .envelope import Envelope
from .kms.local import LocalKms

Out = Callable[[str], None]


# -- the application's model ------------------------------------------------------------


class Base(DeclarativeBase):
    pass


envelope = Envelope(Base.metadata)  # adds the keyring table to Base.metadata


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Encrypted(sa.String(200), envelope))
    # Deterministic: equal emails encrypt equally, so == and UNIQUE work (and
    # the database can see which rows share an email).
    email: Mapped[str] = mapped_column(
        Encrypted(sa.String(320), envelope, deterministic=True), unique=True
    )
    ssn: Mapped[str | None] = mapped_column(Encrypted(sa.String(11), envelope))
    notes: Mapped[dict[str, Any] | None] = mapped_column(Encrypted(sa.JSON, envelope))
    plan: Mapped[str] = mapped_column(sa.String(20))  # an ordinary, unencrypted column


def sample_patients() -> list[Patient]:
    return [
        Patient(name="Ada Lovelace", email="ada@example.org", ssn="078-05-1120",
                notes={"allergies": ["penicillin"]}, plan="gold"),
        Patient(name="Alan Turing", email="alan@example.org", ssn=None, notes=None, plan="basic"),
    ]  # fmt: skip


# -- the steps --------------------------------------------------------------------------


def setup(workdir: Path) -> sa.Engine:
    """A master key file, the application's engine, the envelope configured, the tables."""
    kms = LocalKms.from_file(workdir / "master.key", create=True)  # production: AwsKms("alias/...")
    engine = sa.create_engine(f"sqlite:///{workdir / 'demo.db'}")
    envelope.configure(kms=kms, engine=engine)
    Base.metadata.create_all(engine)  # creates the keyring table too
    return engine


def add_patients(engine: sa.Engine, patients: list[Patient]) -> None:
    """Ordinary ORM code: values are encrypted as they are bound."""
    with Session(engine, expire_on_commit=False) as session:
        session.add_all(patients)
        session.commit()


def show_application_view(engine: sa.Engine, out: Out = print) -> None:
    """What the application reads: plaintext, decrypted as rows load."""
    with Session(engine) as session:
        for p in session.scalars(sa.select(Patient).order_by(Patient.id)):
            out(f"  #{p.id} {p.name} <{p.email}> ssn={p.ssn} notes={p.notes} plan={p.plan}")
        # A deterministic column can be searched by equality.
        found = session.scalars(sa.select(Patient.name).where(Patient.email == "ada@example.org"))
        out(f"  WHERE email == 'ada@example.org' finds: {found.one()}")


def show_raw_rows(engine: sa.Engine, out: Out = print) -> None:
    """What the database holds: a 6-byte header (version, algorithm, key id), then ciphertext."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, name, email, ssn, notes, plan FROM patients ORDER BY id")
        )
        for row in rows:
            out(f"  #{row.id} plan={row.plan!r}")
            for column in ("name", "email", "ssn", "notes"):
                out(f"      {column:<6}{describe_value(getattr(row, column))}")


def show_keyring(engine: sa.Engine, out: Out = print) -> None:
    """The keyring rows: data keys as the KMS wrapped them, never in the clear."""
    keyring = envelope.table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(keyring).order_by(keyring.c.id))
        for row in rows:
            out(
                f"  id={row.id} scope={row.scope!r} state={row.state} "
                f"kms_key_id={row.kms_key_id!r} wrapped_key={_hex(row.wrapped_key)}"
            )


def describe_value(value: object) -> str:
    if value is None:
        return "NULL"
    value = wire.stored_bytes(value)
    if value is None:
        return "not binary (not an encrypted value)"
    parsed = wire.parse_header(value)
    if parsed is None:
        return f"{_hex(value)} (not an encrypted value)"
    algorithm, key_id = parsed
    return f"key {key_id}, {wire.ALGORITHM_NAMES[algorithm]:<11} {_hex(value)}"


def _hex(value: bytes | None, shown: int = 20) -> str:
    if value is None:
        return "NULL"
    value = bytes(value)
    text = value[:shown].hex()
    return f"{text}{'...' if len(value) > shown else ''} ({len(value)} bytes)"


# -- all of it ----------------------------------------------------------------------------


def run(directory: str | os.PathLike[str] | None = None, out: Out = print) -> None:
    """The whole quickstart, in ``directory`` (kept) or a temporary one (removed)."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="sqlalchemy-envelope-demo-") as tmp:
            _run(Path(tmp), out)
        return
    workdir = Path(directory)
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "demo.db").exists():
        raise FileExistsError(f"{workdir / 'demo.db'} exists already; pick an empty directory")
    _run(workdir, out)
    out("")
    out("The files are kept; try the command line on them:")
    out(f"  sqlalchemy-envelope --url sqlite:///{workdir / 'demo.db'} keys list")
    out(
        f"  sqlalchemy-envelope --url sqlite:///{workdir / 'demo.db'} "
        f"--kms local:{workdir / 'master.key'} verify patients"
    )


def _run(workdir: Path, out: Out) -> None:
    engine = setup(workdir)
    try:
        out(f"SQLite database {workdir / 'demo.db'}, local master key {envelope.kms!r}")
        add_patients(engine, sample_patients())
        _show_all(engine, out)

        out("")
        out("=== envelope.rotate('patients'), then one more patient ===")
        envelope.rotate("patients")
        grace = Patient(
            name="Grace Hopper", email="grace@example.org", ssn="219-09-9999", plan="gold"
        )
        add_patients(engine, [grace])
        _show_all(engine, out)
        out("")
        out("Rows 1 and 2 stay under the retired key 1, still readable; `reencrypt patients`")
        out("would move them to key 2, after which key 1 can be destroyed.")
    finally:
        engine.dispose()


def _show_all(engine: sa.Engine, out: Out) -> None:
    out("")
    out("What the application reads:")
    show_application_view(engine, out)
    out("")
    out("What the database holds (patients):")
    show_raw_rows(engine, out)
    out("")
    out(f"The keyring ({envelope.table.name}):")
    show_keyring(engine, out)
