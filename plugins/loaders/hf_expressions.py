"""The ``hf`` loader's row expressions: ``select`` row ranges and ``filter`` predicates.

``filter`` is a small, safe expression language read with :mod:`ast` and evaluated by walking
the tree (never ``eval``). Allowed:

* names: the data's columns (checked against them at validation);
* literals: strings, numbers, ``True``/``False``/``None``, tuples and lists of them;
* comparisons (``== != < <= > >= in not in is is not``), ``and``/``or``/``not``;
* arithmetic on numbers (``+ - * / // %``, unary ``-``), ``+`` on strings;
* ``len(x)`` and the string methods ``lower()``, ``upper()``, ``strip()``,
  ``startswith(s)``, ``endswith(s)``.

Anything else (another call, an attribute, a subscript, a lambda, ``**``, a comprehension...)
is refused when the recipe is validated, with a line saying what was found. ``and``/``or``
short-circuit as in Python, so ``text is not None and len(text) > 20`` is safe on rows
whose ``text`` is missing.

``select`` is one or more row ranges, Python-slice style and comma-separated:
``"0:5000"``, ``"1000:"``, ``":200, 500:600"``; ranges past the end stop at the last row.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable
from typing import Any

MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 40  # nesting of the expression tree: far above any real filter; no recursion to exhaust

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_ARITHMETIC: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_METHODS = {"lower": 0, "upper": 0, "strip": 0, "startswith": 1, "endswith": 1}  # name -> argument count
_ALLOWED = "columns, literals, comparisons, and/or/not, arithmetic, len(), .lower()/.upper()/.strip()/.startswith()/.endswith()"


class ExpressionError(ValueError):
    """A ``filter`` that is not in the language (raised at validation), or one that cannot be
    evaluated on a row (a ``TypeError`` of the data, raised while loading)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "?")
        return f"a call of {name}()"
    if isinstance(node, ast.Attribute):
        return f"the attribute .{node.attr}"
    kinds = {ast.Subscript: "a subscript ([...])", ast.Lambda: "a lambda", ast.Pow: "** (power)",
             ast.NamedExpr: "an assignment (:=)", ast.IfExp: "a conditional (x if c else y)"}
    for kind, what in kinds.items():
        if isinstance(node, kind):
            return what
    return type(node).__name__


class RowFilter:
    """A compiled ``filter`` expression: ``RowFilter(source)(row) -> bool``.

    Pickles as its source text (``datasets`` hashes the function it filters with, so the
    same expression gives the same fingerprint), and compiles again when unpickled."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.names: set[str] = set()
        self._fn = self._compile_source(source)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"])  # type: ignore[misc]

    def __call__(self, row: dict[str, Any]) -> bool:
        try:
            return bool(self._fn(row))
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            raise ExpressionError(f"cannot evaluate {self.source!r} on the row {_short(row)} ({exc})") from None

    def _compile_source(self, source: str) -> Callable[[dict[str, Any]], Any]:
        if not source.strip():
            raise ExpressionError("the expression is empty")
        if len(source) > MAX_EXPRESSION_CHARS:
            raise ExpressionError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"not a valid expression ({exc.msg}, column {exc.offset})") from None
        except (RecursionError, MemoryError, ValueError):
            raise ExpressionError(f"the expression is nested more than {MAX_DEPTH} levels deep") from None
        return self._compile(tree.body, 1)

    def _compile(self, node: ast.AST, depth: int) -> Callable[[dict[str, Any]], Any]:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"the expression is nested more than {MAX_DEPTH} levels deep")
        sub = depth + 1
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                raise ExpressionError(f"the literal {node.value!r} is not allowed (allowed: {_ALLOWED})")
            value = node.value
            return lambda row: value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self._compile(e, sub) for e in node.elts]
            return lambda row: tuple(item(row) for item in items)
        if isinstance(node, ast.Name):
            name = node.id
            self.names.add(name)
            return lambda row: row.get(name)
        if isinstance(node, ast.BoolOp):
            parts = [self._compile(v, sub) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda row: all(p(row) for p in parts)  # short-circuits
            return lambda row: any(p(row) for p in parts)
        if isinstance(node, ast.UnaryOp):
            operand = self._compile(node.operand, sub)
            if isinstance(node.op, ast.Not):
                return lambda row: not operand(row)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                sign = -1 if isinstance(node.op, ast.USub) else 1
                return lambda row: sign * _numeric(operand(row), "-")
            raise ExpressionError(f"{_describe(node.op)} is not allowed (allowed: {_ALLOWED})")
        if isinstance(node, ast.BinOp):
            op = _ARITHMETIC.get(type(node.op))
            if op is None:
                raise ExpressionError(f"{_describe(node.op)} is not allowed (allowed: {_ALLOWED})")
            left, right = self._compile(node.left, sub), self._compile(node.right, sub)
            concat = isinstance(node.op, ast.Add)
            return lambda row: _arithmetic(op, left(row), right(row), concat)
        if isinstance(node, ast.Compare):
            ops = [_COMPARE[type(o)] for o in node.ops]
            operands = [self._compile(node.left, sub), *(self._compile(c, sub) for c in node.comparators)]

            def compare(row: dict[str, Any]) -> bool:
                left = operands[0](row)
                for op, operand in zip(ops, operands[1:]):
                    right = operand(row)
                    if not op(left, right):
                        return False
                    left = right
                return True

            return compare
        if isinstance(node, ast.Call) and not node.keywords:
            if isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1:
                arg = self._compile(node.args[0], sub)
                return lambda row: len(_sized(arg(row)))
            if isinstance(node.func, ast.Attribute) and _METHODS.get(node.func.attr) == len(node.args):
                target, method = self._compile(node.func.value, sub), node.func.attr
                args = [self._compile(a, sub) for a in node.args]
                return lambda row: _string_method(target(row), method, [a(row) for a in args])
        raise ExpressionError(f"{_describe(node)} is not allowed (allowed: {_ALLOWED})")


def _numeric(value: Any, what: str) -> Any:
    if not _number(value):
        raise TypeError(f"{what} needs a number, got {type(value).__name__}")
    return value


def _arithmetic(op: Callable[[Any, Any], Any], left: Any, right: Any, concat: bool) -> Any:
    if concat and isinstance(left, str) and isinstance(right, str):
        return left + right
    if not (_number(left) and _number(right)):
        raise TypeError(f"arithmetic needs numbers, got {type(left).__name__} and {type(right).__name__}")
    return op(left, right)


def _sized(value: Any) -> Any:
    if not isinstance(value, (str, list, tuple, dict)):
        raise TypeError(f"len() of {type(value).__name__}")
    return value


def _string_method(value: Any, method: str, args: list[Any]) -> Any:
    if not isinstance(value, str) or not all(isinstance(a, (str, tuple)) for a in args):
        raise TypeError(f".{method}() needs text, got {type(value).__name__}")
    return getattr(value, method)(*args)


def _short(row: dict[str, Any], limit: int = 80) -> str:
    text = repr(row)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ranges(text: str) -> list[tuple[int, int | None]]:
    """``"0:5000, 6000:"`` -> ``[(0, 5000), (6000, None)]``: comma-separated ``start:stop``
    ranges of row positions (either side may be left out; no negative numbers, no steps)."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        if part.count(":") != 1:
            raise ExpressionError(f"{part!r} is not a row range; write start:stop, e.g. 0:5000")
        start_text, stop_text = (s.strip() for s in part.split(":"))
        try:
            start = int(start_text) if start_text else 0
            stop = int(stop_text) if stop_text else None
        except ValueError:
            raise ExpressionError(f"{part!r} is not a row range of whole numbers, e.g. 0:5000") from None
        if start < 0 or (stop is not None and stop < 0):
            raise ExpressionError(f"{part!r}: row positions count from 0 and cannot be negative")
        if stop is not None and stop <= start:
            raise ExpressionError(f"{part!r} selects no rows (stop must be past start)")
        ranges.append((start, stop))
    return ranges


def range_indices(ranges: list[tuple[int, int | None]], n_rows: int) -> Iterable[int]:
    """The row positions ``ranges`` select in a dataset of ``n_rows``, in order (a position
    selected by two ranges appears twice, as Python slices would give it)."""
    for start, stop in ranges:
        yield from range(min(start, n_rows), min(n_rows if stop is None else stop, n_rows))


def in_ranges(ranges: list[tuple[int, int | None]]) -> tuple[Callable[[int], bool], int | None]:
    """For a stream: a test of whether position ``i`` is selected, and the position after
    which nothing more is (None: the last range is open). Streams read each row once, so
    overlapping ranges select a row once."""
    ends = [stop for _, stop in ranges]
    last = None if any(e is None for e in ends) else max(e for e in ends if e is not None)
    return (lambda i: any(start <= i and (stop is None or i < stop) for start, stop in ranges)), last
