"""The plans PostgreSQL chose for the service's statements, read from `EXPLAIN (FORMAT JSON)`: a statement is
prepared as the service's connections prepare it (their generic plan, `plan_cache_mode = force_generic_plan`,
unless the read asks for its own) and run with SQL literals for its `:name` parameters. Counted in rows and
relations, never timed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from billing.db import pipeline


def prepare(name: str, statement: str) -> str:
    """`PREPARE name AS` the statement, its parameters numbered as the service's pipeline numbers them."""
    query, _ = pipeline.compiled(statement)
    return f"PREPARE {name} AS {query.decode()}"


def execute(name: str, statement: str, literals: Mapping[str, str]) -> str:
    """`EXECUTE name(...)` with the statement's parameters as SQL literals, by name."""
    _, names = pipeline.compiled(statement)
    return f"EXECUTE {name}({', '.join(literals[n] for n in names)})"


def explain(name: str, statement: str, literals: Mapping[str, str], *, analyze: bool = False) -> str:
    """The plan of `execute(...)` as JSON; with `analyze`, run, with what each node read."""
    return f"EXPLAIN ({'ANALYZE, ' if analyze else ''}FORMAT JSON) {execute(name, statement, literals)}"


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a plan tree."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def scans(plan: dict[str, Any], relation: str) -> list[dict[str, Any]]:
    """The nodes that read `relation`."""
    return [node for node in nodes(plan) if node.get("Relation Name") == relation]


def rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows the plan took from `relation` (with ANALYZE): those it passed on, and those it read and filtered out."""
    return sum(
        (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for node in scans(plan, relation)
    )
