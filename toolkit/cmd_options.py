"""Click parameter types for the numeric options: a value out of its range (toolkit.limits), NaN, or not a
number is a usage error naming the range."""
from __future__ import annotations

import click

from toolkit import limits


class Ranged(click.ParamType):
    def __init__(self, limit: limits.Limit):
        self.limit = limit
        self.name = ("integer" if limit.integer else "number") + " " + limit.describe()

    def convert(self, value, param, ctx):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            text = str(value).strip()
            try:
                value = int(text) if self.limit.integer else float(text)
            except ValueError:
                self.fail(f"{text[:40]!r} is not {'an integer' if self.limit.integer else 'a number'}", param, ctx)
        if self.limit.integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        problem = self.limit.check(value)
        if problem:
            self.fail(f"{str(value)[:40]} {problem}", param, ctx)
        return value


def train(name: str) -> Ranged:
    """The type of training option ``name`` (a key of limits.TRAIN)."""
    return Ranged(limits.TRAIN[name])


WINDOWS = Ranged(limits.WINDOWS)
THREADS = Ranged(limits.THREADS)
TOKENS = Ranged(limits.TOKENS)
BUDGET_BYTES = Ranged(limits.BUDGET_BYTES)
BPW = Ranged(limits.BPW)
CONFIRM = Ranged(limits.CONFIRM)
