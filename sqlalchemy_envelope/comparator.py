"""What SQL may ask of an encrypted column.

Randomized ciphertext says nothing about its plaintext, so every comparison
but ``IS [NOT] NULL`` is refused when the statement is built, naming the
column (a comparison with another column: when it is compiled, see
:class:`ColumnComparison`). A deterministic column answers ``==``, ``!=``, ``in_`` and
``not_in``: the value is encrypted under every readable key of the scope (so
rows not yet re-encrypted after a rotation still match), at execution time,
through an expanding bind parameter; building the statement does no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, ColumnClause, ColumnElement, Null
from sqlalchemy.types import TypeDecorator

from .errors import ConfigurationError, EncryptedComparisonError

if TYPE_CHECKING:
    from .column import Encrypted

# Operators that never look at the value: ordering ciphertext (documented) and NULL tests.
_PASS = frozenset(
    {
        operators.is_,
        operators.is_not,
        operators.asc_op,
        operators.desc_op,
        operators.nulls_first_op,
        operators.nulls_last_op,
        operators.distinct_op,
        operators.collate,
    }
)
_EQUALITY = {
    operators.eq: operators.in_op,
    operators.ne: operators.not_in_op,
    operators.in_op: operators.in_op,
    operators.not_in_op: operators.not_in_op,
}


def _name(expr: Any) -> str:
    table = getattr(getattr(expr, "table", None), "name", None)
    column = getattr(expr, "name", None) or "?"
    return f"{table}.{column}" if table else str(column)


def _refused_name(expr: Any, other: tuple[Any, ...]) -> str:
    """The encrypted column a refusal names: ``expr``'s, or where ``expr`` has none (a
    literal that took the column's type, as in ``"x" + Model.name``), an encrypted column
    among the operands, or else the column whose type it took (a CASE, a scalar subquery).
    Never a Python operand's ``name`` (an Enum member's is its value)."""
    if _name(expr) == "?":
        for element in other:
            encrypted = isinstance(element, ColumnElement) and isinstance(
                element.comparator, EncryptedComparator
            )
            if encrypted and _name(element) != "?":
                return _name(element)
        binding = getattr(getattr(expr, "type", None), "_binding", None)
        if binding is not None and binding.name is not None:
            return f"{binding.table}.{binding.name}" if binding.table else str(binding.name)
    return _name(expr)


class EncryptedComparator(TypeDecorator.Comparator[Any]):
    __slots__ = ()

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> ColumnElement[Any]:
        other = tuple(_clause(o) for o in other)
        if op in _PASS:
            return super().operate(op, *other, **kwargs)
        type_: Encrypted = self.expr.type  # type: ignore[assignment]
        if op in (operators.eq, operators.ne) and other and _is_null(other[0]):
            return super().operate(op, *other, **kwargs)  # renders IS [NOT] NULL
        if op in (operators.eq, operators.ne) and other and _itself(self.expr, other[0]):
            # Not a user's comparison: SQLAlchemy finding a column among others
            # (a dict lookup calls ==, as the ORM's bulk UPDATE and RETURNING do).
            return super().operate(op, *other, **kwargs)
        if op in (operators.eq, operators.ne) and other and isinstance(other[0], ColumnClause):
            return ColumnComparison(self.expr, other[0], op, sa.Boolean())
        name = _refused_name(self.expr, other)
        if not type_.deterministic:
            raise EncryptedComparisonError(
                f"{name} is encrypted with random nonces, so SQL cannot compare it "
                f"({getattr(op, '__name__', op)}); only IS NULL / IS NOT NULL work. "
                "Use deterministic=True for a column you must look up by equality."
            )
        target = _EQUALITY.get(op)
        if target is None:
            raise EncryptedComparisonError(
                f"{name} is encrypted deterministically: only ==, !=, in_() and not_in() "
                f"can be answered, not {getattr(op, '__name__', op)}"
            )
        values = _plain_values(name, op, other[0])
        lookup = super().operate(target, _lookup_parameter(type_, values), **kwargs)
        # Wrapped so that the ORM's Python evaluator (bulk UPDATE/DELETE with
        # synchronize_session="evaluate" or "auto") cannot evaluate it: it would
        # compare loaded plaintext with ciphertext, match nothing and leave the
        # session stale. "auto" then fetches the matched rows instead.
        return sa.type_coerce(lookup, sa.Boolean())

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> ColumnElement[Any]:
        if op in (operators.eq, operators.ne):
            return self.operate(op, other, **kwargs)
        raise EncryptedComparisonError(f"{_name(self.expr)} is encrypted and cannot be compared")


_NEGATED = {operators.eq: operators.ne, operators.ne: operators.eq}


class ColumnComparison(BinaryExpression[bool]):
    """``encrypted == other_column``: refused when compiled rather than when built.

    In SQL it would compare ciphertexts under different sub-keys. But
    SQLAlchemy itself asks whether a column is in a list or set of columns
    (the ORM's bulk INSERT ... RETURNING of an entity, for one), which calls
    ``==`` and takes the truth value of the result: an identity test, as for
    any column, which must keep working.
    """

    inherit_cache = True

    def _negate(self) -> ColumnElement[Any]:
        return ColumnComparison(self.left, self.right, _NEGATED[self.operator], self.type)


@compiles(ColumnComparison)
def _refuse(element: ColumnComparison, compiler: Any, **kw: Any) -> str:
    raise EncryptedComparisonError(
        f"{_name(element.left)} is encrypted, so SQL cannot compare it with another "
        f"column ({_name(element.right)}): each column encrypts under its own sub-key"
    )


def _is_null(value: Any) -> bool:
    return value is None or isinstance(value, Null)


def _clause(value: Any) -> Any:
    """An ORM attribute (``Model.column``) as the column it stands for; anything else as is."""
    element = getattr(value, "__clause_element__", None)
    return element() if callable(element) else value


def _itself(expr: Any, other: Any) -> bool:
    """Whether ``other`` is the same column as ``expr`` (with or without ORM annotations)."""
    if other is expr:
        return True
    if not isinstance(other, ColumnElement):
        return False
    return bool(other._deannotate() is expr._deannotate())


def _plain_values(name: str, op: Any, other: Any) -> Sequence[Any]:
    values = other if op in (operators.in_op, operators.not_in_op) else [other]
    if isinstance(values, (ColumnElement, sa.sql.Select)) or not isinstance(
        values, (list, tuple, set, frozenset)
    ):
        raise EncryptedComparisonError(
            f"{name} can only be compared with Python values, not with SQL expressions "
            "(each column encrypts under its own sub-key)"
        )
    values = [_clause(v) for v in values]
    if any(isinstance(v, (ColumnElement, sa.sql.ClauseElement)) for v in values):
        raise EncryptedComparisonError(f"{name} can only be compared with Python values")
    return values


class StoredForms(TypeDecorator[bytes]):
    """A lookup's values: the stored forms of what is looked up, bound as binary."""

    impl = sa.LargeBinary
    cache_ok = True

    def literal_processor(self, dialect: sa.Dialect) -> Any:
        # Refused before a value is seen: SQLAlchemy would quote it in its CompileError.
        raise ConfigurationError(
            "a deterministic lookup cannot be rendered as SQL literals (literal_binds or "
            "offline migrations): its values are computed when it executes"
        )


def _lookup_parameter(type_: Encrypted, values: Sequence[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(
        f"{type_.bound_name()}_lookup",
        callable_=functools.partial(type_.lookup_ciphertexts, tuple(values)),
        expanding=True,
        type_=StoredForms(),
        unique=True,
    )
