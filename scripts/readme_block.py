"""The README's generated blocks: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

from pathlib import Path


def replace_block(readme: Path, name: str, body: str) -> None:
    """Put `body` between the block's markers in `readme`; a README without them is left alone."""
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
