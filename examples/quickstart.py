"""Quickstart: encrypted columns with ordinary SQLAlchemy code.

Run from a clone, after ``pip install -e .`` (no other service needed)::

    python examples/quickstart.py

The model comes from ``sqlalchemy_envelope/demo.py``; its encrypted columns
are declared like this::

    envelope = Envelope(Base.metadata)

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Encrypted(sa.String(200), envelope))
        email: Mapped[str] = mapped_column(
            Encrypted(sa.String(320), envelope, deterministic=True), unique=True)
        ssn: Mapped[str | None] = mapped_column(Encrypted(sa.String(11), envelope))
        notes: Mapped[dict | None] = mapped_column(Encrypted(sa.JSON, envelope))
        plan: Mapped[str] = mapped_column(sa.String(20))   # not encrypted

The same steps run as ``sqlalchemy-envelope demo``.
"""

import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import LocalKms
from sqlalchemy_envelope.demo import Base, Patient, envelope, show_keyring, show_raw_rows

with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(tmp)

    # 1. A master key. LocalKms keeps it in a file, for development;
    #    in production use AwsKms("alias/app-pii") instead.
    kms = LocalKms.from_file(workdir / "master.key", create=True)

    # 2. The application's engine. The envelope gets the KMS and the engine;
    #    create_all creates the keyring table along with the application's tables.
    engine = sa.create_engine(f"sqlite:///{workdir / 'quickstart.db'}")
    envelope.configure(kms=kms, engine=engine)
    Base.metadata.create_all(engine)

    # 3. Write with ordinary ORM code: values are encrypted as they are bound.
    with Session(engine) as session:
        session.add_all([
            Patient(name="Ada Lovelace", email="ada@example.org", ssn="078-05-1120",
                    notes={"allergies": ["penicillin"]}, plan="gold"),
            Patient(name="Alan Turing", email="alan@example.org", plan="basic"),
        ])  # fmt: skip
        session.commit()

    # 4. Read with ordinary ORM code: values are decrypted as rows load.
    #    The deterministic email column can be searched by equality.
    print("What the application reads:")
    with Session(engine) as session:
        ada = session.scalars(sa.select(Patient).where(Patient.email == "ada@example.org")).one()
        print(f"  {ada.name} <{ada.email}> ssn={ada.ssn} notes={ada.notes} plan={ada.plan}")

    # 5. What the database itself holds: a header naming the data key, then ciphertext.
    print("\nWhat the database holds (SELECT * FROM patients):")
    show_raw_rows(engine)

    # 6. The keyring: one data key per scope (here: per table), wrapped by the master key.
    print("\nThe keyring (SELECT * FROM envelope_data_keys):")
    show_keyring(engine)

    engine.dispose()
