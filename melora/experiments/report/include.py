"""Generated numbers in hand-written documents: include blocks, filled from the files the builders write.

A document (README.md, ``docs/*.md``, ``results/**/README.md``) marks where a
generated file goes::

    <!-- include results/tables/headline.md -->
    ...the file's text, written here by :func:`update`...
    <!-- end include -->

``#<heading>`` after the path takes one section of a Markdown file (the lines
under that heading, up to the next heading of the same or a higher level):
``<!-- include results/bench/layer-lockstep.md#Targets (full layer) -->``.
Paths are relative to the repository root. ``make docs`` (and every results
build) rewrites the blocks; a test checks that every block equals its file, so
a document never shows a number its tables do not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from melora.experiments.specs import ROOT
from melora.files import atomic_write_text

BLOCK = re.compile(r"(<!-- include (?P<source>[^#>]+?)(?:#(?P<section>[^>]+?))? -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
DOCUMENTS = ("README.md", "docs/*.md", "results/README.md", "results/bench/README.md")


def section_of(text: str, heading: str) -> str:
    """The lines under Markdown heading ``heading`` (any level) up to the next heading of the same or a higher level.

    Raises:
        ValueError: no such heading.
    """
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = re.match(r"(#+) (.*)", line.rstrip("\n"))
        if match and match.group(2).strip() == heading.strip():
            level, out = len(match.group(1)), []
            for rest in lines[i + 1 :]:
                other = re.match(r"(#+) ", rest)
                if other and len(other.group(1)) <= level:
                    break
                out.append(rest)
            return "".join(out).strip("\n") + "\n"
    raise ValueError(f"no heading '{heading}' in the included file")


def included_text(source: str, section: str | None, root: Path = ROOT) -> str:
    """The text a block of ``source`` (``#section``) holds, ending in a newline.

    Raises:
        FileNotFoundError: ``source`` does not exist (build it first: its block names the file).
    """
    path = root / source.strip()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the results builder writes it (make results, make glue-verdicts, make bench-layer)")
    text = path.read_text()
    text = section_of(text, section) if section else text
    return text if text.endswith("\n") else text + "\n"


def render(text: str, root: Path = ROOT, missing: list[str] | None = None) -> str:
    """``text`` with every include block filled from its file.

    ``missing``: when given, a block whose file does not exist yet is left as it is and its
    source appended here (a results build that made only some files); else that raises.
    """
    def fill(m: re.Match) -> str:
        source = m.group("source").strip()
        if missing is not None and not (root / source).is_file():
            missing.append(source)
            return m.group(0)
        return m.group(1) + included_text(source, m.group("section"), root) + m.group(5)

    return BLOCK.sub(fill, text)


def blocks(text: str) -> list[tuple[str, str | None, str]]:
    """``(source, section, body)`` of every include block of ``text``."""
    return [(m.group("source").strip(), m.group("section"), m.group("body")) for m in BLOCK.finditer(text)]


def documents(root: Path = ROOT) -> list[Path]:
    """The documents that may hold include blocks."""
    return sorted({p for pattern in DOCUMENTS for p in root.glob(pattern)})


def update(paths: list[Path] | None = None, root: Path = ROOT, missing: list[str] | None = None) -> list[Path]:
    """Rewrite the include blocks of ``paths`` (default: :func:`documents`); returns the documents that changed.

    ``missing``: as in :func:`render` (blocks of files not built yet are kept and listed there).
    """
    changed = []
    for path in paths or documents(root):
        text = path.read_text()
        new = render(text, root, missing)
        if new != text:
            atomic_write_text(path, new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m melora.experiments.report.include [documents…]``: fill the include blocks; prints what changed."""
    import argparse

    parser = argparse.ArgumentParser(description="Fill the '<!-- include … -->' blocks of the documents from the generated files.")
    parser.add_argument("documents", nargs="*", type=Path, help="default: README.md, docs/*.md, results/README.md, results/bench/README.md")
    args = parser.parse_args(argv)
    try:
        changed = update(args.documents or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
