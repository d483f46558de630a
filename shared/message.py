"""Compatibility name for the model code: the message base class lives in
:mod:`shared.protocol.schema` (new code imports it from :mod:`shared.protocol`)."""

from __future__ import annotations

from shared.protocol.schema import Message

__all__ = ["Message"]
