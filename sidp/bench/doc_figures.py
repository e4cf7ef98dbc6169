"""The check that keeps the docs' prose figures sourced: outside generated tables, code fences and code
spans, every figure (a decimal, a ratio like 1.2x, a percentage, a comma-grouped integer) must be one that
a generated table of the same section shows, or a value of a JSON file the section names (rounded as
written; a percentage may be the value times 100)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sidp.bench.doc_tables import BEGIN, END, HOME, ROOT, load

FIGURE = re.compile(  # not inside a word, a version (2.13.0) or a name like Llama-3.1
    r"(?<![\w.,/])(?<![A-Za-z_]-)[-−+]?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?P<unit>%|x\b|×)?(?!\d|[.,]\d)"
)
JSON_NAME = re.compile(r"[\w./~-]+\.json\b")
HEADING = re.compile(r"#{1,3} ")
CODE_SPAN = re.compile(r"`[^`]*`")
COMMENT = re.compile(r"<!--.*?-->")


@dataclass(slots=True)
class Section:
    heading: str
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, text without code spans)
    shown: set[tuple[str, str]] = field(default_factory=set)  # figures of its generated tables
    named: set[str] = field(default_factory=set)  # JSON paths it mentions


def figures(text: str) -> list[tuple[str, str, str]]:
    """(as written, number without commas, unit) for each figure; plain integers are settings, not figures."""
    out = []
    for m in FIGURE.finditer(text.replace("**", "")):
        num, unit = m.group("num"), (m.group("unit") or "").replace("×", "x")
        if unit or "." in num or "," in num:
            out.append((m.group(0), num.replace(",", ""), unit))
    return out


def sections(text: str) -> list[Section]:
    found = [Section("(top)")]
    in_block = in_fence = False
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not (in_block or in_fence) and HEADING.match(line):
            found.append(Section(line))
        here = found[-1]
        here.named.update(JSON_NAME.findall(line))
        if in_block:
            in_block = stripped != END
            if in_block:
                here.shown.update((num, unit) for _, num, unit in figures(line))
        elif BEGIN.fullmatch(stripped):
            in_block = True
        elif stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence:
            here.prose.append((number, CODE_SPAN.sub(" ", COMMENT.sub(" ", line))))
    return found


def values(name: str, root: Path = ROOT) -> tuple[float, ...]:
    """Every number in the JSON a doc names: a path from the repository root, or a file name under docs/."""
    path = (
        name
        if (root / name).is_file()
        else next((str(p.relative_to(root)) for p in sorted((root / "docs").rglob(Path(name).name))), None)
    )
    if path is None:
        return ()
    leaves: list[float] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list):
            for item in x:
                walk(item)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            leaves.append(float(x))

    walk(load(path, root))
    return tuple(leaves)


def backed(num: str, unit: str, leaves: tuple[float, ...]) -> bool:
    decimals = len(num.partition(".")[2])
    scales = (1, 100) if unit == "%" else (1,)
    return any(f"{abs(v) * s:.{decimals}f}" == num for v in leaves for s in scales)


def unsourced(text: str, root: Path = ROOT, name: str = "doc") -> list[str]:
    """One line for each prose figure that no table of its section shows and no JSON it names holds."""
    problems = []
    for section in sections(text):
        leaves = tuple(v for n in sorted(section.named) for v in values(n, root))
        for number, line in section.prose:
            for written, num, unit in figures(line):
                if (num, unit) not in section.shown and not backed(num, unit, leaves):
                    problems.append(
                        f"{name}:{number}: {written.strip()} is in no table of its section "
                        f"({section.heading.strip()}) and in no JSON it names"
                    )
    problems += [
        f"{name}:{i}: a machine's home folder"
        for i, line in enumerate(text.split("\n"), 1)
        if HOME.search(line)
    ]
    return problems
