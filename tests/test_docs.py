"""The documentation against the code: links resolve, named commands and options exist, column tables are generated.

Reads README.md, CHANGELOG.md and docs/*.md; runs no model and reaches no network.
"""
from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MEASURES = ROOT / "docs" / "measures.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
FILES = [README, ROOT / "CHANGELOG.md", *PAGES]
MAX_README_LINES = 250
#: The set-up commands CI runs verbatim from the README.
SETUP_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && alignscope analyze",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q',
)
#: Code blocks whose lines are command lines (a Python block's ``import alignscope`` is not one).
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
COMMAND = re.compile(r"(?<![\w.-])alignscope[ \t]+([A-Za-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
SHELL_SEPARATOR = re.compile(r"&&|\|\||;|\|")
MARKED_TABLE = re.compile(r"<!-- columns:(?P<group>[a-z]+) -->(?P<body>.*?)<!-- /columns -->", re.S)


# ---------------------------------------------------------------------------------------------- reading Markdown
def split_markdown(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The prose (fenced code blocks blanked, line numbers kept) and the code blocks as (language, body)."""
    prose, blocks, fence, language, body = [], [], None, "", []
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, body = match.group(1), match.group(2).lower(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip(fence[0]).strip():
            blocks.append((language, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def code_spans(prose: str) -> list[str]:
    """Inline code, one string per span (a span may wrap onto the next line; it never crosses a blank line)."""
    spans = []
    for paragraph in re.split(r"\n[ \t]*\n", prose):
        spans += [re.sub(r"\s*\n\s*", " ", m.group(2)).strip() for m in CODE_SPAN.finditer(paragraph)]
    return spans


def without_code_spans(prose: str) -> str:
    return "\n\n".join(CODE_SPAN.sub(lambda m: " " * len(m.group(0)), p) for p in re.split(r"\n[ \t]*\n", prose))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its address
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose.split("\n"):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_targets(path: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    prose = without_code_spans(prose)
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML_LINK) for m in pattern.finditer(prose)]


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it points to, anchor or '') for every link that is not a URL."""
    links = []
    for target in link_targets(path):
        if SCHEME.match(target):
            continue
        address, _, anchor = target.partition("#")
        links.append((target, (path.parent / unquote(address)).resolve() if address else path, unquote(anchor)))
    return links


def command_lines(path: Path) -> list[str]:
    """Lines of shell-like code blocks (continuations joined, comments dropped) and every inline code span."""
    prose, blocks = split_markdown(path.read_text(encoding="utf-8"))
    lines = []
    for language, body in blocks:
        if language in SHELL_LANGUAGES:
            for line in re.sub(r"\\\n\s*", " ", body).split("\n"):
                lines.append(re.sub(r"(^|\s)#.*$", "", line))
    return lines + code_spans(prose)


def named_commands(line: str) -> list[tuple[str, list[str]]]:
    """Each ``alignscope <command>`` on a line with the options that follow it on the same command."""
    found = []
    matches = [m for m in COMMAND.finditer(line) if not re.search(r"\b(?:import|from)\s+$", line[:m.start()])]
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        rest = SHELL_SEPARATOR.split(line[match.end():end], maxsplit=1)[0]
        found.append((match.group(1), OPTION.findall(rest)))
    return found


def marked_tables(text: str) -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    for match in MARKED_TABLE.finditer(text):
        tables.setdefault(match.group("group"), []).append(match.group("body"))
    return tables


# ---------------------------------------------------------------------------------------------- 1. links
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    broken = []
    for written, target, anchor in relative_links(path):
        if not target.exists():
            broken.append(f"{written}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{written}: no heading '#{anchor}' in {target.relative_to(ROOT)}")
        elif anchor and target.suffix != ".md":
            broken.append(f"{written}: an anchor into a file that is not Markdown")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_slugs_follow_github():
    assert slug("Layouts: reading any timm model's outputs") == "layouts-reading-any-timm-models-outputs"
    assert slug("Searched warps (`--optimal`)") == "searched-warps---optimal"
    assert slug("Columns of `alignment.csv`") == "columns-of-alignmentcsv"
    assert slug("The gate: `alignscope check`") == "the-gate-alignscope-check"
    assert slug("[Set up](#x) now") == "set-up-now"


def test_the_link_check_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A heading\n")
    page.write_text("[ok](other.md#a-heading) [missing](nothing.md) [bad anchor](other.md#nowhere) "
                    "[url](https://example.invalid/x.md) `[in code](nothing.md)`\n\n"
                    "```\n[in a block](nothing.md)\n```\n")
    problems = [(w, t.exists(), a in anchors(t) if t.exists() else None) for w, t, a in relative_links(page)]
    assert problems == [("other.md#a-heading", True, True), ("nothing.md", False, None),
                        ("other.md#nowhere", True, False)]


# ---------------------------------------------------------------------------------------------- 2. commands and options
@pytest.fixture(scope="module")
def cli_options():
    from alignscope.cli.main import app

    group = {o for p in app.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    return {name: group | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            for name, command in app.commands.items()}


def test_named_commands_and_options_exist(cli_options):
    problems, seen = [], set()
    for path in FILES:
        for line in command_lines(path):
            for command, options in named_commands(line):
                seen.add(command)
                if command not in cli_options:
                    problems.append(f"{path.relative_to(ROOT)}: `alignscope {command}` is not a command ({line!r})")
                    continue
                problems += [f"{path.relative_to(ROOT)}: `alignscope {command}` has no option {o} ({line!r})"
                             for o in options if o not in cli_options[command]]
    assert not problems, "\n".join(problems)
    assert {"analyze", "check", "layers", "explain", "bench", "stn"} <= seen  # the scan found the command lines


def test_the_command_scan_reads_command_lines():
    line = ("torchrun --nnodes 2 -m alignscope analyze --device cuda --out run1 > t.json && "
            "alignscope check a.csv --max aligned_error=0.5 [--min x=1] # --not-an-option")
    assert named_commands(re.sub(r"(^|\s)#.*$", "", line)) == [
        ("analyze", ["--device", "--out"]), ("check", ["--max", "--min"])]
    assert named_commands("from alignscope import analyze; alignscope.analyze(transforms=['rotate-45'])") == []
    page = ("Gate with `alignscope check\nalignment.csv --min p=0.9`.\n\n"
            "```bash\nalignscope stn \\\n    --quick  # note\n```\n")
    prose, blocks = split_markdown(page)
    assert code_spans(prose) == ["alignscope check alignment.csv --min p=0.9"]
    assert blocks == [("bash", "alignscope stn \\\n    --quick  # note")]


# ---------------------------------------------------------------------------------------------- 3. column tables
def test_column_tables_are_generated():
    from alignscope.columns import markdown_table

    tables = marked_tables(MEASURES.read_text(encoding="utf-8"))
    assert sorted(tables) == ["fitted", "layer", "lie", "output", "placement"], sorted(tables)
    for group, bodies in tables.items():
        assert len(bodies) == 1, f"{group}: {len(bodies)} marked tables"
        assert bodies[0] == "\n" + markdown_table(group) + "\n", (
            f"the {group} table of docs/measures.md is not markdown_table({group!r}): run python docs/make_columns.py")


def test_column_tables_name_every_column_and_only_columns():
    from alignscope.columns import all_names

    named = set()
    for bodies in marked_tables(MEASURES.read_text(encoding="utf-8")).values():
        for row in bodies[0].strip().split("\n")[2:]:
            first_cell = row.split("|")[1]
            base, *suffixes = re.findall(r"`([^`]+)`", first_cell)
            named |= {base, *(base + s for s in suffixes)}
    assert named <= all_names(), sorted(named - all_names())
    assert all_names() <= named, sorted(all_names() - named)


def test_make_columns_leaves_the_page_as_it_is(tmp_path):
    spec = importlib.util.spec_from_file_location("make_columns", ROOT / "docs" / "make_columns.py")
    make_columns = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_columns)
    text = MEASURES.read_text(encoding="utf-8")
    assert make_columns.render(text) == text
    stale = tmp_path / "measures.md"
    stale.write_text(text.replace("<!-- columns:layer -->\n", "<!-- columns:layer -->\n| stale |\n", 1))
    assert make_columns.main(["--check", str(stale)]) == 1
    assert make_columns.main([str(stale)]) == 0 and stale.read_text() == text


# ---------------------------------------------------------------------------------------------- 4. the README
def test_readme_is_short_and_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has {len(text.splitlines())} lines"
    linked = {target for _, target, _ in relative_links(README)}
    missing = [p.relative_to(ROOT).as_posix() for p in PAGES if p.resolve() not in linked]
    assert PAGES and not missing, f"README.md links no {missing}"


def test_readme_keeps_the_setup_commands_ci_runs():
    lines = README.read_text(encoding="utf-8").splitlines()
    for command in SETUP_COMMANDS:
        assert command in lines, command
