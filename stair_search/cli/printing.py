"""Printing search responses for people (a rich table; ``--json`` prints ``SearchHit.to_dict`` instead)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stair_search.retrieve import SearchResponse


def print_response(response: SearchResponse, explain: bool = False, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    heading = title or f"mode={response.mode}" + (f" fusion={response.fusion}" if response.fusion else "")
    table = Table(title=heading, show_lines=False)
    for column in ("rank", "id", "score", "caption", "parts"):
        table.add_column(column, overflow="fold")
    if explain:
        table.add_column("matched", overflow="fold")
    for hit in response.hits:
        parts = " ".join(f"{route}={score:.3f}" for route, score in hit.parts.items())
        row = [str(hit.rank), hit.id, f"{hit.score:.4f}", hit.caption[:40], parts]
        if explain:
            tokens = [f"{_stood_for(t, hit.matched_words)} {q:.2f}x{d:.2f}"
                      for t, (q, d) in list((hit.matched or {}).items())[:6]]
            words = [f"text:{word}" for word in (hit.text_matched or {})]  # the text route's matched words
            row.append(", ".join(tokens + words))
        table.add_row(*row)
    Console().print(table)


def _stood_for(token: str, words: dict[str, str]) -> str:
    """``ham (of hamster)`` for a piece searched for a longer query word, so the column never passes it off as the
    word itself; other tokens as they are."""
    return f"{token} (of {words[token]})" if token in words else token
