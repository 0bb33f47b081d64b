"""What batch jobs report: counts, key ids and column names, never a value."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: Why a value could not be read (keys of ``unreadable_by_cause``).
NOT_AUTHENTIC = "not authentic"
KEY_NOT_FOUND = "key not found"
KEY_DESTROYED = "key destroyed"


@dataclass
class ColumnReport:
    """Counts for one column."""

    by_key: Counter[int] = field(default_factory=Counter)
    plaintext: int = 0
    unreadable: int = 0
    null: int = 0
    unreadable_by_cause: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.plaintext == 0 and self.unreadable == 0


@dataclass
class VerifyReport:
    """``envelope.verify(table)``: values per key id, plaintext and unreadable counts.

    ``by_key`` counts values that authenticated; ``plaintext`` values without
    our header (never encrypted, or written around the library);
    ``unreadable`` values that carry our header but cannot be read: tampered,
    truncated, moved from another column, foreign, or under a key that is
    missing or destroyed (``unreadable_by_cause`` says which).
    """

    table: str
    rows: int = 0
    columns: dict[str, ColumnReport] = field(default_factory=dict)

    @property
    def by_key(self) -> dict[int, int]:
        total: Counter[int] = Counter()
        for column in self.columns.values():
            total.update(column.by_key)
        return dict(sorted(total.items()))

    @property
    def plaintext(self) -> int:
        return sum(c.plaintext for c in self.columns.values())

    @property
    def unreadable(self) -> int:
        return sum(c.unreadable for c in self.columns.values())

    @property
    def unreadable_by_cause(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for column in self.columns.values():
            total.update(column.unreadable_by_cause)
        return dict(total)

    @property
    def ok(self) -> bool:
        return self.plaintext == 0 and self.unreadable == 0

    def __str__(self) -> str:
        keys = ", ".join(f"key {k}: {n}" for k, n in self.by_key.items()) or "no values"
        state = "ok" if self.ok else "PROBLEMS FOUND"
        return (
            f"{self.table}: {self.rows} rows, {keys}; plaintext: {self.plaintext}, "
            f"unreadable: {self.unreadable} ({state})"
        )


@dataclass
class ReencryptReport:
    """``envelope.reencrypt(table)``: what moved to the active key and what could not.

    ``values_rewritten`` values moved to their scope's active key;
    ``values_current`` were already there; ``values_changed`` were changed by
    the application while the job ran (left as the application wrote them);
    ``plaintext`` and ``unreadable`` values were left alone (see ``verify``);
    ``duplicates`` stayed under their old key because, under the active key,
    each equals another row's value in a deterministic column with a unique
    constraint (the application wrote it after the rotation): resolve the
    duplicate rows, then run again.
    """

    table: str
    rows: int = 0
    values_rewritten: int = 0
    values_current: int = 0
    values_changed: int = 0
    plaintext: int = 0
    unreadable: int = 0
    duplicates: int = 0
    active_keys: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plaintext == 0 and self.unreadable == 0 and self.duplicates == 0

    def add(self, other: ReencryptReport) -> None:
        self.rows += other.rows
        self.values_rewritten += other.values_rewritten
        self.values_current += other.values_current
        self.values_changed += other.values_changed
        self.plaintext += other.plaintext
        self.unreadable += other.unreadable
        self.duplicates += other.duplicates
        self.active_keys.update(other.active_keys)

    def __str__(self) -> str:
        return (
            f"{self.table}: {self.rows} rows, {self.values_rewritten} values re-encrypted, "
            f"{self.values_current} already current, {self.values_changed} changed meanwhile, "
            f"{self.plaintext} plaintext, {self.unreadable} unreadable"
            + (
                f", {self.duplicates} duplicates left under their old key"
                if self.duplicates
                else ""
            )
        )


@dataclass
class ColumnJobReport:
    """``encrypt_column`` / ``decrypt_column``: rows converted and whether the swap is done."""

    table: str
    column: str
    rows: int = 0
    swapped: bool = False
    already_done: bool = False

    def __str__(self) -> str:
        if self.already_done:
            return f"{self.table}.{self.column}: already done"
        return f"{self.table}.{self.column}: {self.rows} rows converted, swapped: {self.swapped}"
