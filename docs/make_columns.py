"""Rewrite the column tables of docs/measures.md from alignscope.columns.

Each table sits between ``<!-- columns:GROUP -->`` and ``<!-- /columns -->`` (GROUP: layer, output, placement, lie,
fitted) and is the text of ``alignscope.columns.markdown_table(GROUP)``; everything outside the markers
is left as it is.

    python docs/make_columns.py            # rewrite the tables in place
    python docs/make_columns.py --check    # exit 1 if a table is out of date, change nothing
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "measures.md"
#: One marked table: the opening marker with its group, the text between, the closing marker.
MARKED = re.compile(r"(<!-- columns:(?P<group>[a-z]+) -->)(?P<body>.*?)(<!-- /columns -->)", re.S)


def render(text: str) -> str:
    """``text`` with every marked table replaced by the generated one."""
    from alignscope.columns import markdown_table

    return MARKED.sub(lambda m: f"{m.group(1)}\n{markdown_table(m.group('group'))}\n{m.group(4)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the tables are up to date")
    parser.add_argument("page", nargs="?", type=Path, default=PAGE,
                        help="the Markdown page (default: docs/measures.md)")
    args = parser.parse_args(argv)
    old = args.page.read_text(encoding="utf-8")
    if not MARKED.search(old):
        print(f"{args.page}: no <!-- columns:GROUP --> markers", file=sys.stderr)
        return 1
    new = render(old)
    if new == old:
        print(f"{args.page}: column tables up to date")
        return 0
    if args.check:
        print(f"{args.page}: column tables out of date; run python docs/make_columns.py", file=sys.stderr)
        return 1
    args.page.write_text(new, encoding="utf-8")
    print(f"{args.page}: column tables rewritten")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's columns, not those of an installed copy
    sys.exit(main())
