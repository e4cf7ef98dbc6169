"""Read a checkpoint lazily, one tensor at a time: a safetensors folder (single file or sharded) or a GGUF.

Everything above this module sees Hugging Face names and layouts, whatever the format on disk, so the
model code has one way to get a weight: `open_checkpoint(path).read(name, dtype)`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import safe_open

from sidp.errors import SidpError

if TYPE_CHECKING:  # transformers takes seconds to import; only load_tokenizer needs it, at call time
    from transformers import PreTrainedTokenizerBase

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint(Protocol):
    def names(self) -> list[str]:
        """Every tensor name, as Hugging Face spells it (e.g. "model.layers.3.mlp.up_proj.weight")."""
        ...

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor in HF layout, converted to dtype: contiguous and owning its memory."""
        ...


class SafetensorsCheckpoint:
    """A folder of safetensors files; each `read` maps the file holding the tensor, copies the tensor out
    and unmaps it. A handle kept open would keep every page read so far mapped, and counted in the
    process's memory, until the whole model is loaded: at start-up a replica would briefly hold its
    weights twice."""

    def __init__(self, folder: Path):
        self._where: dict[str, Path] = {}  # tensor name → the file holding it
        for file in _safetensors_files(folder):
            with _open_safetensors(folder / file) as handle:
                self._where.update((name, folder / file) for name in handle.keys())  # noqa: SIM118

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise SidpError(
                f"Tensor {name!r} is not in this checkpoint; is it a complete model of a supported family?"
            )
        with _open_safetensors(file) as handle:
            # a view of the mapped file: copied so that callers own their tensors and the map can go
            return handle.get_tensor(name).to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at path: a safetensors folder (one file or shards), a .gguf, or a folder with one."""
    resolved = _resolve(path)
    if resolved.is_file():
        from sidp.model.gguf_checkpoint import open_gguf

        return open_gguf(resolved)
    return SafetensorsCheckpoint(resolved)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model's Hugging Face config as a dict (synthesized from the metadata for a GGUF)."""
    resolved = _resolve(path)
    if resolved.is_file():
        from sidp.model.gguf_checkpoint import open_gguf

        return open_gguf(resolved).config()
    config = _read_json(resolved / "config.json")
    if not isinstance(config, dict):
        raise SidpError(f"{resolved / 'config.json'} is not a JSON object; restore the model's config.json.")
    return config


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """A conversation as the model reads it: the chat template's text, and its token ids (the template
    already wrote the special tokens, so encoding adds none)."""
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return text, tokenizer.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a transformers PreTrainedTokenizerBase), with its chat template."""
    from transformers import AutoTokenizer

    resolved = _resolve(path)
    if resolved.is_file():
        from sidp.model.gguf_checkpoint import open_gguf

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.parent, gguf_file=resolved.name)
        except Exception as error:  # transformers raises many types here; all mean "cannot build it"
            raise SidpError(
                f"Cannot build a tokenizer from {resolved}: {error}. "
                "Use the model's safetensors folder instead."
            ) from None
        if not getattr(tokenizer, "chat_template", None):
            # transformers does not always carry the GGUF's template over; without it chat() cannot work.
            tokenizer.chat_template = open_gguf(resolved).chat_template()
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except Exception as error:
        raise SidpError(
            f"Cannot load the tokenizer in {resolved}: {error}. "
            "The folder needs the tokenizer files saved with the model."
        ) from None


def load_decoder(path: str | os.PathLike) -> Callable[[list[int]], str]:
    """Token ids → text, as the model's tokenizer decodes them without its special tokens: what a replica
    needs to see stop strings. Read from tokenizer.json with the `tokenizers` library alone where the
    folder has one, the library transformers' tokenizer decodes with: about a third of the memory of a
    whole transformers tokenizer, which would load transformers into every replica."""
    resolved = _resolve(path)
    file = resolved / "tokenizer.json"
    settings = resolved / "tokenizer_config.json"
    cleans_up = settings.is_file() and _read_json(settings).get("clean_up_tokenization_spaces")
    if resolved.is_file() or not file.is_file() or cleans_up:  # transformers' own clean-up is its own
        tokenizer = load_tokenizer(path)
        return functools.partial(tokenizer.decode, skip_special_tokens=True)
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot read
        raise SidpError(f"Cannot read {file}: {error}. Save the tokenizer with the model again.") from None
    return functools.partial(backend.decode, skip_special_tokens=True)


def _resolve(path: str | os.PathLike) -> Path:
    """The .gguf file to read, or the safetensors folder; raises when path cannot be a checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SidpError(f"Model path {p} does not exist; pass a model folder or a .gguf file.")
    if p.is_file():
        if p.suffix != ".gguf":
            raise SidpError(f"{p} is a file but not a .gguf; pass the model's folder or a .gguf file.")
        return p
    if (p / SINGLE_FILE).exists() or (p / INDEX_FILE).exists():
        if not (p / "config.json").exists():
            raise SidpError(f"{p} has weights but no config.json; copy the model's config.json into it.")
        return p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise SidpError(f"{p} holds several GGUF files ({names}); pass the one to use.")
    if not (p / "config.json").exists():
        raise SidpError(
            f"{p} holds no model: it needs config.json and {SINGLE_FILE} (or shards), or a single .gguf file."
        )
    raise SidpError(
        f"{p} has a config.json but no {SINGLE_FILE} or {INDEX_FILE}; download the weights into it."
    )


def _safetensors_files(folder: Path) -> list[str]:
    """The weight files: the shards the index names, or the single model.safetensors."""
    if (folder / INDEX_FILE).exists():
        index = _read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SidpError(f"{folder / INDEX_FILE} has no weight_map; restore it from the model's source.")
        for file in set(weight_map.values()):
            if not (folder / file).exists():
                raise SidpError(f"Shard {file} listed in {INDEX_FILE} is missing from {folder}; download it.")
        return sorted(set(weight_map.values()))
    return [SINGLE_FILE]


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError or OSError
        raise SidpError(
            f"Cannot read {file}: {error}. The file is corrupt or incomplete; download it again."
        ) from None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SidpError(f"Cannot read {file}: {error}. Check the file exists and is readable.") from None
    except json.JSONDecodeError as error:
        raise SidpError(f"{file} is not valid JSON ({error}); restore it from the model's source.") from None
