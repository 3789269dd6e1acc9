"""Generators that return a value (``return x`` inside a generator) are used throughout the engine:
the frame loops yield frames and return the final result.  :class:`Returning` lets a ``for`` loop
consume one and keep what it returned."""
from __future__ import annotations

from typing import Any, Generator, Generic, Iterator, TypeVar

__all__ = ["Returning"]

Y = TypeVar("Y")


class Returning(Generic[Y]):
    """``it = Returning(gen); for item in it: ...; it.value`` is what ``gen`` returned."""

    def __init__(self, gen: Generator[Y, Any, Any]):
        self.gen = gen
        self.value: Any = None

    def __iter__(self) -> Iterator[Y]:
        self.value = yield from self.gen
