"""SiDP as a vLLM weight offloader: the seam vLLM gives for deciding where a decoder layer's weights live.

`wrap_modules` sees the decoder layers as vLLM builds them and marks their pooled linears (sidp's
placement decides who owns which layer); `post_init`, once the weights are loaded and before the KV cache
is made, moves the owned ones into memory the peers can map (sidp's CPU transport), meets the other ranks
(rendezvous), and points each borrowed parameter at its owner's pages, freeing the rank's own copy. This
is sidp's "map" mode: a borrowed layer computes on the owner's pages in place, so the layers need no hooks
and torch.compile sees plain parameters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Generator

import torch
import torch.nn as nn
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.offloader.base import BaseOffloader
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

from sidp.errors import SidpError
from sidp.memory import format_bytes
from sidp.pool.modes import default_mode
from sidp.pool.placement import Placement
from sidp.pool.transport import transport_for
from sidp.vllm_plugin import rendezvous
from sidp.vllm_plugin.pooled import pooled_parameters
from sidp.vllm_plugin.settings import Settings

logger = init_logger("vllm.sidp")  # under vLLM's logger, so its lines print as vLLM's own do


class SidpOffloader(BaseOffloader):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.vllm_config = None  # the model's, read as vLLM builds it
        self.transport = transport_for("cpu")
        self.mode = default_mode(self.transport)  # "map": the CPU transport's peer views are local memory
        self.layers: list[dict[str, nn.Parameter]] = []  # per decoder layer: its pooled parameters
        self.summary: dict | None = None  # what post_init did, for the log and for tests

    def wrap_modules(
        self, modules_generator: Generator[nn.Module, None, None], prefix: str = ""
    ) -> list[nn.Module]:
        if self.layers:
            raise SidpError("This model builds more than one stack of layers; sidp pools a single decoder.")
        self.vllm_config = get_current_vllm_config()
        if self.vllm_config.parallel_config.world_size > 1:
            raise SidpError(
                "sidp's vLLM plugin pools across ranks of one worker each: run every rank with "
                "tensor_parallel_size=1 and pipeline_parallel_size=1."
            )
        self._key_compiled_code()
        modules = list(modules_generator)
        self.layers = [pooled_parameters(m, i, self.settings.parts) for i, m in enumerate(modules)]
        return modules

    def _key_compiled_code(self) -> None:
        """Pooled linears multiply with torch's linear, not vLLM's packed kernel, so their compiled graph
        differs: vLLM keys its torch.compile cache by a hash of the config, which takes in
        `additional_config`, so the pooled parts go there and the two graphs never load in place of
        each other."""
        extra = self.vllm_config.additional_config
        if not isinstance(extra, dict):
            raise SidpError("sidp needs vLLM's additional_config to be a dict (it keys compiled code there).")
        extra["sidp"] = {"pooled_parts": sorted(self.settings.parts)}

    def post_init(self) -> None:
        if self.summary is not None:  # once, however many times a runner calls it
            return
        if not self.layers:
            raise SidpError("vLLM built this model without make_layers, so sidp never saw its layers.")
        s = self.settings
        placement = Placement.build(len(self.layers), s.size, s.placement)
        owned = {layer: self._export(layer) for layer in placement.owned_by(s.rank)}
        message = {"fingerprint": self._fingerprint(), "layers": owned}
        peers = rendezvous.exchange(s.group, s.rank, s.size, message, s.timeout_s)
        self._check_same_model(peers)
        freed = sum(
            self._borrow(layer, peers[placement.owners[layer]]) for layer in placement.remote_for(s.rank)
        )
        return_free_memory()
        self.summary = {
            "rank": s.rank,
            "size": s.size,
            "parts": sorted(s.parts),
            "mode": self.mode,
            "owners": list(placement.owners),
            "owned": placement.owned_by(s.rank),
            "pooled_bytes": sum(p.nbytes for layer in self.layers for p in layer.values()),
            "freed_bytes": freed,
            "kv_bytes_per_token": self._kv_bytes_per_token(),
        }
        self._log()

    def _export(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s pooled parameters moved into memory its peers can map; the private copy goes."""
        shared = {}
        for name, param in self.layers[layer].items():
            shared[name] = param.data = self.transport.export(param.data)
        return shared

    def _check_same_model(self, peers: dict[int, dict]) -> None:
        mine = self._fingerprint()
        for rank, peer in peers.items():
            if peer["fingerprint"] != mine:
                raise SidpError(
                    f"Rank {rank} of SiDP group {self.settings.group!r} runs {peer['fingerprint']}, this "
                    f"rank {mine} (model, dtype, layers, pooled parts): give every rank the same."
                )

    def _borrow(self, layer: int, peer: dict) -> int:
        """Point layer `layer`'s pooled parameters at its owner's pages; the bytes of the copy let go."""
        freed = 0
        for name, param in self.layers[layer].items():
            view = self.transport.open(peer["layers"][layer][name])
            if (view.shape, view.dtype, view.stride()) != (param.shape, param.dtype, param.stride()):
                raise SidpError(
                    f"Layer {layer}'s {name} differs between the ranks: {view.shape} here {param.shape}."
                )
            freed += param.data.nbytes
            param.data = view
        return freed

    def _fingerprint(self) -> tuple:
        model = self.vllm_config.model_config
        return (model.model, str(model.dtype), len(self.layers), tuple(sorted(self.settings.parts)))

    def _kv_bytes_per_token(self) -> int:
        model, cache = self.vllm_config.model_config, self.vllm_config.cache_config
        dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
        layers = model.get_num_layers(self.vllm_config.parallel_config)
        return 2 * layers * model.get_total_num_kv_heads() * model.get_head_size() * dtype.itemsize

    def _log(self) -> None:
        m = self.summary
        parts = ",".join(m["parts"])
        layers = ", ".join(map(str, m["owned"]))
        logger.info(
            "sidp: rank %d of %d owns the %s of layers %s (%d of %d); the other %d layers map their owners' "
            "pages (sidp mode %r: no hooks on the layers, torch.compile sees plain parameters)",
            m["rank"], m["size"], parts, layers, len(m["owned"]), len(m["owners"]),
            len(m["owners"]) - len(m["owned"]), m["mode"],
        )  # fmt: skip
        freed, per_token = m["freed_bytes"], m["kv_bytes_per_token"]
        logger.info("sidp: freed %s of this rank's weights before its KV cache is made", format_bytes(freed))
        fixed = self.vllm_config.cache_config.kv_cache_memory_bytes
        more = (
            f"{format_bytes(freed)} freed hold {freed // per_token} more KV tokens ({per_token} bytes each)"
        )
        if fixed is not None:  # vLLM's CPU build: VLLM_CPU_KVCACHE_SPACE fixes the cache, it does not grow
            logger.info(
                "sidp: the KV cache is fixed at %s (VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes); the "
                "%s: kv_cache_memory_bytes=%d (without VLLM_CPU_KVCACHE_SPACE, which wins) uses them",
                format_bytes(fixed), more, fixed + freed,
            )  # fmt: skip
        else:  # sized from this process's RSS, which counts the pages mapped from peers in full
            logger.info(
                "sidp: the %s, but vLLM's CPU build sizes the KV cache from this process's RSS, which counts "
                "the pages it maps from its peers in full: give kv_cache_memory_bytes to use them",
                more,
            )


def return_free_memory(model=None) -> None:
    """Hand the heap's freed pages back to the system (glibc keeps them otherwise); `model` is there so
    that `llm.apply_model` can run it in a worker."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)
