"""Stage functions for two consecutive stages on any two strategies (the seams between
strategies, in tests/test_conformance.py). Module-level, and the module imports nothing,
so that strategies that copy functions by qualified name (a subinterpreter imports this
module by name) run them and load it quickly."""

from __future__ import annotations


def add_one(x: int) -> int:
    return x + 1


def triple(x: int) -> int:
    return x * 3


async def add_one_async(x: int) -> int:
    return x + 1


async def triple_async(x: int) -> int:
    return x * 3


def total(batch: list[int]) -> int:
    return sum(batch)


async def total_async(batch: list[int]) -> int:
    return sum(batch)
