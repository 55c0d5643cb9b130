"""Rendering a report: a list of blocks (heading, paragraph, preformatted text, table, image)
written twice, to Markdown and to HTML, so that both always say the same.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Block:
    kind: str  # h1 | h2 | p | pre | table | img
    content: object


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if block.kind == "h1":
            out.append(f"# {block.content}\n")
        elif block.kind == "h2":
            out.append(f"## {block.content}\n")
        elif block.kind == "p":
            out.append(f"{block.content}\n")
        elif block.kind == "pre":
            out.append(f"```\n{block.content}\n```\n")
        elif block.kind == "table":
            rows = block.content
            out.append("| " + " | ".join(rows[0]) + " |")
            out.append("|" + " --- |" * len(rows[0]))
            out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
            out.append("")
        elif block.kind == "img":
            out.append(f"![{Path(str(block.content)).stem}]({block.content})\n")
    return "\n".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        text = block.content
        if block.kind in ("h1", "h2", "p"):
            body.append(f"<{block.kind}>{html.escape(str(text))}</{block.kind}>")
        elif block.kind == "pre":
            body.append(f"<pre>{html.escape(str(text))}</pre>")
        elif block.kind == "table":
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                    for c in row
                )
                + "</tr>"
                for i, row in enumerate(text)
            )
            body.append(f"<table>{rows}</table>")
        elif block.kind == "img":
            body.append(f'<img src="{html.escape(str(text))}" alt="{html.escape(str(text))}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(out_dir: Path, blocks: list[Block], title: str = "decoupled report") -> list[Path]:
    """Write report.md and report.html into ``out_dir`` (each via a temporary file and an
    atomic rename, so an interrupted write never leaves half a report)."""
    paths = []
    for name, text in (
        ("report.md", render_markdown(blocks)),
        ("report.html", render_html(blocks, title)),
    ):
        path = out_dir / name
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
        paths.append(path)
    return paths
