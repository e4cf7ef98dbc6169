"""Scale-out: each node runs its own SiDP group on its share of the input (by a stable hash of the
id) and writes its own output part; `sidp merge` joins the parts. Weights are pooled only within a node.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from sidp.batch.formats import line_id
from sidp.batch.job import errors_path
from sidp.errors import SidpError


def nodes_from_env() -> tuple[int, int]:
    """(number of nodes, this node's rank) as torchrun sets them (one process per node), else (1, 0)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return 1, 0
    per_node = int(env.get("LOCAL_WORLD_SIZE", 1))
    return int(env["WORLD_SIZE"]) // per_node, int(env.get("GROUP_RANK", int(env.get("RANK", 0)) // per_node))


def node_of(request_id: str, num_nodes: int) -> int:
    """The node that serves an id: the same on every node, in every run, whatever PYTHONHASHSEED says."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_nodes


def part_path(output: Path, node_rank: int, num_nodes: int) -> Path:
    return output.with_name(f"{output.stem}.part-{node_rank:03d}-of-{num_nodes:03d}{output.suffix}")


def check_nodes(num_nodes: int, node_rank: int) -> None:
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise SidpError(f"--node-rank {node_rank} must be in 0..{num_nodes - 1} for --num-nodes {num_nodes}.")


def merge(output: Path) -> tuple[int, int]:
    """Join every part of `output` (and of its errors file) into one file; (results, parts)."""
    pattern = re.compile(
        re.escape(output.stem) + r"\.part-(\d{3})-of-(\d{3})" + re.escape(output.suffix) + "$"
    )
    parts = sorted(p for p in output.parent.glob(f"{output.stem}.part-*") if pattern.match(p.name))
    if not parts:
        raise SidpError(
            f"No parts of {output} to merge (looked for {output.stem}.part-NNN-of-NNN{output.suffix})."
        )
    totals = {int(pattern.match(p.name).group(2)) for p in parts}
    expected = totals.pop() if len(totals) == 1 else None
    if expected is None or len(parts) != expected:
        raise SidpError(
            f"Found {len(parts)} parts of {output}, not one from each node; finish every node first."
        )
    seen: set[str] = set()
    lines = []
    for part in parts:
        for line in part.read_text(encoding="utf-8").split("\n"):
            request_id = line_id(line) if line else None
            if request_id is None:
                continue
            if request_id in seen:
                raise SidpError(f"{part} answers {request_id!r} again; parts must not overlap.")
            seen.add(request_id)
            lines.append(line + "\n")
    output.write_text("".join(lines), encoding="utf-8")
    errors = [e for p in parts if (e := errors_path(p)).exists()]
    merged_errors = sorted(
        (json.loads(x) for e in errors for x in e.read_text(encoding="utf-8").split("\n") if x),
        key=lambda record: record["line"],
    )
    errors_path(output).write_text("".join(json.dumps(r) + "\n" for r in merged_errors), encoding="utf-8")
    return len(lines), len(parts)
