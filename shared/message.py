"""The base of every message the actors and clients exchange.

A message is a frozen dataclass with a wire ``TAG`` and a ``VERSION``; the set of messages is
closed: only classes decorated with :func:`message` can be sent or received. ``shared.messages``
defines them all; ``shared.wire`` turns them into plain msgpack-able data and back, validating
every field against the class's annotations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

REGISTRY: dict[str, type[Message]] = {}

M = TypeVar("M", bound="type[Message]")


class Message:
    """Base for every message. Subclasses are frozen, slotted dataclasses made by :func:`message`."""

    TAG: ClassVar[str]
    VERSION: ClassVar[int] = 1
    __slots__ = ()

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def message(tag: str, version: int = 1):
    """Class decorator: make ``cls`` a frozen slotted dataclass and register it under ``tag``."""

    def wrap(cls: M) -> M:
        if tag in REGISTRY:
            raise ValueError(f"duplicate message tag {tag!r}")
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        cls.TAG = tag
        cls.VERSION = version
        REGISTRY[tag] = cls
        return cls

    return wrap
