"""What hosts tell each other by NOTIFY, on one channel per schema: "q" (jobs to claim),
"e:<ids>" (jobs ended: long-polls wake) and "c:<ids>" (jobs cancelled: the host running
one kills it)."""

from __future__ import annotations

from typing import NamedTuple

_IDS = 150  # ids per payload (PostgreSQL takes 8000 bytes at most)


class Notice(NamedTuple):
    kind: str  # "q", "e" or "c"
    ids: list[str]


def channel(schema: str) -> str:
    return f"poold_{schema}"


def encode(kind: str, ids: list[str]) -> list[str]:
    return [kind] if not ids else [f"{kind}:{','.join(ids[i:i + _IDS])}" for i in range(0, len(ids), _IDS)]


def decode(payload: str) -> Notice:
    kind, _, ids = payload.partition(":")
    return Notice(kind, ids.split(",") if ids else [])
