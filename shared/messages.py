"""Compatibility name for the model code (``from shared import messages as m``): every message is
declared in :mod:`shared.protocol.messages`, which this module re-exports."""

from __future__ import annotations

from shared.protocol.messages import *  # noqa: F403
