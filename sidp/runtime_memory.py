"""What a replica process holds beyond its ledger's arithmetic, measured once by a fresh process and
cached, so that the memory ledger can count it: the runtime it holds before its first weight (Python,
torch and its libraries, sidp's CPU kernels), the decoder it loads on its first stop string, and, for a
replica in the driver's process, the driver's tokenizer.

Each figure is a resident set, every page counted in full: a replica's PSS (the measure `sidp bench`
checks it against) counts its share of pages mapped by k processes as 1/k, which is less, and the resident
set does not depend on which other processes happen to share torch's libraries at the time. Figures are
cached per interpreter, torch, sidp source and CPU path (and tokenizer), so later starts read them
instead of paying a process start (about 2 s).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sidp.errors import SidpError
from sidp.paths import cache_root

PROBE_TIMEOUT_S = 300  # the first probe on a machine may compile the CPU kernels (seconds to a minute)
_SOURCES = Path(__file__).resolve().parent


@functools.cache  # one figure for the life of a process, whatever changes on disk meanwhile
def runtime_bytes(device: str) -> int:
    """The runtime of a replica on `device`, in bytes. 0 for a GPU: its budget is the GPU's memory, which
    the host process's runtime does not use."""
    if device != "cpu":
        return 0
    return _cached("runtime", [])


@functools.cache
def decoder_bytes(model: str, device: str) -> int:
    """What a replica on `device` adds when it loads its stop-string decoder for `model` (0 for a GPU)."""
    if device != "cpu":
        return 0
    return _cached(f"decoder-{_tokenizer_digest(model)}", ["--decoder", model])


@functools.cache
def tokenizer_bytes(model: str, device: str) -> int:
    """What the driver's tokenizer for `model` adds to a process (transformers with it): counted for a
    replica that runs in the driver's process (0 for a GPU)."""
    if device != "cpu":
        return 0
    return _cached(f"tokenizer-{_tokenizer_digest(model)}", ["--tokenizer", model])


def _tokenizer_digest(model: str) -> str:
    path = Path(model).expanduser()
    files = [path] if path.is_file() else [path / "tokenizer.json", path / "tokenizer_config.json"]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _cached(name: str, argv: list[str]) -> int:
    cached = _cache_folder() / f"{name}.json"
    try:
        return int(json.loads(cached.read_text(encoding="utf-8"))["rss_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    measured = _measure(argv)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, suffix=".tmp") as out:
        json.dump({"rss_bytes": measured}, out)
    os.replace(out.name, cached)  # whole or not at all, should two starts measure at once
    return measured


def _cache_folder() -> Path:
    from sidp.model.cpu_kernels import chosen_path

    digest = hashlib.sha256(f"{sys.version}|{torch.__version__}|{chosen_path()}".encode())
    for source in sorted(_SOURCES.rglob("*.py")):  # an import added to sidp changes the runtime
        digest.update(source.read_bytes())
    return cache_root() / "runtime" / digest.hexdigest()[:16]


def _measure(argv: list[str]) -> int:
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from sidp.runtime_memory import main; main(sys.argv[1:])",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SidpError(
            f"Measuring a replica's memory took over {PROBE_TIMEOUT_S} s; is the machine overloaded?"
        ) from None
    if done.returncode != 0:
        raise SidpError(f"Could not measure a replica's memory: {done.stderr.strip()[-2000:]}")
    return int(done.stdout.split()[-1])


def _rss() -> int:
    from sidp.bench.resident import rss_bytes

    return rss_bytes(os.getpid()) or 0  # 0 where the kernel does not say (not Linux): nothing counted


def _probe_runtime() -> int:
    """This process's resident set once it has imported and run what a replica does before its weights."""
    import sidp.engine.replica  # noqa: F401 (everything a replica imports)
    from sidp.model import fused
    from sidp.model.linear import linear

    x = torch.ones(4, 64)
    fused.rms_norm(linear(x, torch.ones(64, 64)), torch.ones(64), 1e-6)  # load the kernels, start the threads
    return _rss()


def _probe_decoder(model: str) -> int:
    """What loading the stop-string decoder adds to this process, once it has decoded a token."""
    from sidp.model.checkpoint import load_decoder

    before = _rss()
    load_decoder(model)([0])
    return _rss() - before


def _probe_tokenizer(model: str) -> int:
    """What loading the driver's tokenizer adds to this process, once it has encoded and decoded."""
    from sidp.model.checkpoint import load_tokenizer

    before = _rss()
    tokenizer = load_tokenizer(model)
    tokenizer.decode(tokenizer.encode("a"))
    return _rss() - before


def main(argv: list[str] | None = None) -> None:
    """The probe's entry: prints one figure in bytes."""
    parser = argparse.ArgumentParser(description="Measure what a replica holds (sidp's memory ledger).")
    probed = parser.add_mutually_exclusive_group()
    probed.add_argument("--decoder", metavar="MODEL", help="the stop-string decoder of MODEL")
    probed.add_argument("--tokenizer", metavar="MODEL", help="the driver's tokenizer of MODEL")
    args = parser.parse_args(argv)
    if args.decoder:
        print(_probe_decoder(args.decoder))
    elif args.tokenizer:
        print(_probe_tokenizer(args.tokenizer))
    else:
        print(_probe_runtime())
