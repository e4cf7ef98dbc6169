"""The tables in README.md and docs/*.md that are rendered from the JSON files runs wrote, so that a
figure in the docs cannot drift from its run: each sits between markers naming a kind and its JSONs,

    <!-- table KIND docs/bench/a.json [docs/bench/b.json ...] [option=value] -->
    ...rendered here: the JSONs' commands, the table, the machine and date...
    <!-- end table -->

and `python -m sidp.bench.doc_tables --write FILE...` re-renders them in place (`--check` lists the stale
ones and the prose figures that no JSON backs, and exits 1; see sidp/bench/doc_figures.py)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sidp.bench import (
    doc_kinds,
    doc_kinds_calibration,
    doc_kinds_paper,
    doc_kinds_plan,
    doc_kinds_scripts,
    doc_kinds_vllm,
)
from sidp.machine import flags_text

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/BENCHMARKS.md", "docs/RELIABILITY.md")
BEGIN = re.compile(r"<!-- table (\S+)((?: \S+)*) -->")
END = "<!-- end table -->"
KINDS = {
    **doc_kinds.KINDS,
    **doc_kinds_scripts.KINDS,
    **doc_kinds_plan.KINDS,
    **doc_kinds_paper.KINDS,
    **doc_kinds_calibration.KINDS,
    **doc_kinds_vllm.KINDS,
}
HOME = re.compile(r"(?:/root|/home/[^/\s]+)(?=/)")  # a machine's home folder, never written into the repo


class DocError(ValueError):
    """A marker names an unknown kind or a JSON that is not there, or a block has no end marker."""


@dataclass(slots=True)
class Block:
    kind: str
    paths: list[str]
    options: dict[str, str]
    first: int  # index of the begin marker's line
    last: int  # index of the end marker's line
    body: str  # the lines between the markers


def blocks(text: str, name: str = "doc") -> list[Block]:
    lines = text.split("\n")
    found = []
    i = 0
    while i < len(lines):
        m = BEGIN.fullmatch(lines[i].strip())
        if m:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
            if end is None:
                raise DocError(f"{name}:{i + 1}: a table block without `{END}`.")
            args = m.group(2).split()
            paths = [a for a in args if "=" not in a]
            options = dict(a.split("=", 1) for a in args if "=" in a)
            body = "\n".join(lines[i + 1 : end])
            found.append(Block(m.group(1), paths, options, i, end, body))
            i = end
        i += 1
    return found


def load(path: str, root: Path = ROOT) -> dict:
    try:
        return json.loads((root / path).read_text(encoding="utf-8"))
    except OSError as error:
        raise DocError(f"{path}: {error.strerror}.") from None
    except json.JSONDecodeError as error:
        raise DocError(f"{path}: not JSON ({error}).") from None


def render(block: Block, root: Path = ROOT) -> str:
    """The block's body as its kind renders it from its JSONs: commands, table, machine, date, notes."""
    try:
        renderer = KINDS[block.kind]
    except KeyError:
        raise DocError(f"unknown table kind {block.kind!r}; one of {', '.join(sorted(KINDS))}.") from None
    docs = [load(p, root) for p in block.paths]
    parts = []
    commands = list(dict.fromkeys(c for c in map(command, docs) if c))
    if commands:
        parts.append("```bash\n" + "\n".join(commands) + "\n```")
    try:
        parts.append(renderer(block.paths, docs, block.options))
    except (KeyError, IndexError, TypeError, ValueError, StopIteration) as error:
        # a JSON whose writer changed its fields: say which block, so its kind can follow
        raise DocError(
            f"table {block.kind} {' '.join(block.paths)}: {type(error).__name__} {error}"
        ) from None
    parts.append(provenance(block.paths, docs))
    return HOME.sub("~", "\n\n".join(p for p in parts if p))


def command(doc: dict) -> str | None:
    cmd = doc.get("command") or doc.get("meta", {}).get("command")
    if isinstance(cmd, list):  # argv as recorded: "python3.11 sidp ..." ran the sidp script
        cmd = shlex.join(cmd[1:] if len(cmd) > 1 and cmd[1] == "sidp" else cmd)
    return cmd


def machine(doc: dict) -> str | None:
    """The CPU a JSON's run was on, its bf16 flags (where recorded), cores and torch."""
    if "machine" in doc:
        m = doc["machine"]
        flags = flags_text(m["cpu_flags"]) if "cpu_flags" in m else "flags not recorded"
        return f"{m['cpu']} ({flags}), {m['cores']} cores, torch {m['torch']}"
    if "cpu" in doc.get("meta", {}):
        m = doc["meta"]
        return f"{m['cpu']} (kernel path {m['path']}, {m['capability']}), torch {m['torch']}"
    if "cpu" in doc:
        return f"{doc['cpu']} (flags not recorded), {doc['cores']} cores, Python {doc['python']}"
    return None


def when(docs: list[dict]) -> str:
    stamps = sorted(datetime.fromisoformat(d["timestamp"]) for d in docs if "timestamp" in d)
    if not stamps:
        return "date not recorded"
    first, last = stamps[0], stamps[-1]
    if first == last:
        return f"{first:%Y-%m-%d %H:%M} UTC"
    if first.date() == last.date():
        return f"{first:%Y-%m-%d %H:%M}-{last:%H:%M} UTC"
    return f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"


def provenance(paths: list[str], docs: list[dict]) -> str:
    """Where and when the JSONs' runs were, then their notes (one line per distinct note)."""
    machines = list(dict.fromkeys(m for m in map(machine, docs) if m))
    lines = []
    if len(machines) == 1:
        lines.append(f"Ran on {machines[0]}; {when(docs)}.")
    elif machines:
        lines += [
            f"- `{Path(p).name}` ran on {machine(d)}; {when([d])}." for p, d in zip(paths, docs, strict=True)
        ]
    notes: dict[str, list[str]] = {}
    for path, doc in zip(paths, docs, strict=True):
        for key in ("code", "note"):
            if doc.get(key):
                notes.setdefault(doc[key], []).append(f"`{Path(path).name}`")
    if notes:
        lines += ["", *(f"- {', '.join(names)}: {note}." for note, names in notes.items())]
    return "\n".join(lines)


def rewrite(text: str, root: Path = ROOT, name: str = "doc") -> str:
    lines = text.split("\n")
    for block in reversed(blocks(text, name)):
        lines[block.first + 1 : block.last] = render(block, root).split("\n")
    return "\n".join(lines)


def stale(text: str, root: Path = ROOT, name: str = "doc") -> list[str]:
    """One line for each block whose body differs from its rendering."""
    return [
        f"{name}:{b.first + 1}: table {b.kind} {' '.join(b.paths)} is stale"
        for b in blocks(text, name)
        if b.body != render(b, root)
    ]


def main(argv: list[str] | None = None) -> int:
    from sidp.bench.doc_figures import unsourced

    parser = argparse.ArgumentParser(description="Re-render or check the docs' tables generated from JSON.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="re-render every table block in place")
    mode.add_argument("--check", action="store_true", help="list stale blocks and unsourced figures")
    parser.add_argument("files", nargs="*", type=Path, help=f"default: {' '.join(DOCS)}")
    args = parser.parse_args(argv)
    problems = []
    for path in args.files or [ROOT / d for d in DOCS]:
        text = path.read_text(encoding="utf-8")
        try:
            if args.write:
                if (new := rewrite(text, name=str(path))) != text:
                    path.write_text(new, encoding="utf-8")
                    print(f"rewrote {path}")
            else:
                problems += stale(text, name=str(path)) + unsourced(text, name=str(path))
        except DocError as error:
            problems.append(str(error))
    if problems or not args.write:
        print("\n".join(problems) or "every table and figure matches its JSON")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
