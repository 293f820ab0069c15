"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class CoaloraError(Exception):
    """A user-facing problem: bad input, missing asset, budget that cannot be met."""
