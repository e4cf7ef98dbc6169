"""Which parameters of a vLLM decoder layer are pooled: those of the linear layers under its `mlp` (and,
when pooled, `self_attn`) module, the counterpart of sidp.model.decoder's PART_OPS.

vLLM's CPU build repacks each linear's weight for oneDNN once it is loaded and drops the plain tensor; a
repacked weight is private to its process, so a pooled linear is asked to skip that (the flag vLLM's own
MLA layers use) and keeps a plain weight, which it multiplies with torch's linear and which a peer can map.
"""

from __future__ import annotations

import torch.nn as nn
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

from sidp.errors import SidpError

PART_MODULES = {"mlp": "mlp", "attn": "self_attn"}  # a layer part -> the name of its module in vLLM's layers


def pooled_parameters(layer: nn.Module, index: int, parts: frozenset[str]) -> dict[str, nn.Parameter]:
    """Layer `index`'s pooled parameters by qualified name, each linear they belong to set to keep its
    weight plain. A SidpError where a part has no plain (unquantized) linear to pool."""
    found: dict[str, nn.Parameter] = {}
    for part in sorted(parts):
        prefix = PART_MODULES[part] + "."
        linears = [
            (n, m) for n, m in layer.named_modules() if n.startswith(prefix) and isinstance(m, LinearBase)
        ]
        if not linears:
            raise SidpError(f"Layer {index} has no linear layers under {prefix[:-1]!r} for sidp to pool.")
        for name, linear in linears:
            if type(linear.quant_method) is not UnquantizedLinearMethod:
                raise SidpError(
                    f"Layer {index}'s {name} is quantized ({type(linear.quant_method).__name__}); sidp pools "
                    "unquantized weights only."
                )
            linear._cpu_skip_gemm_dispatch = True
            found.update({f"{name}.{p}": param for p, param in linear.named_parameters(recurse=False)})
    return found
