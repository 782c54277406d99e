"""User-facing errors: each carries one line that names the problem."""

from __future__ import annotations


class UdfcError(Exception):
    """A problem with the user's input or request, reported as one line with exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
