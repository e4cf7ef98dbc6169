"""Loading a replica's share of the pool: only the pooled tensors it owns, read from disk straight into
memory its peers can map (the transport's export)."""

from __future__ import annotations

from sidp.model.checkpoint import Checkpoint
from sidp.model.decoder import PART_OPS, Weights, read_part
from sidp.model.spec import ModelSpec
from sidp.pool.placement import Placement


def load_owned(
    checkpoint: Checkpoint, spec: ModelSpec, placement: Placement, rank: int, parts, dtype, transport
) -> tuple[dict[int, Weights], Weights]:
    """(owned layer -> its pooled weights, the embedding / LM head when pooled here), all exported."""

    def read(name: str):
        return checkpoint.read(name, dtype)

    layers = {}
    for layer in placement.owned_by(rank):
        layers[layer] = {}
        for part in (p for p in PART_OPS if p in parts):  # the per-layer parts; "embed" is read below
            weights = read_part(read, spec, layer, part)
            layers[layer].update({name: transport.export(t) for name, t in weights.items()})
    whole = {}
    if "embed" in parts and placement.embed_owner == rank:
        embed = transport.export(read("model.embed_tokens.weight"))
        lm_head = embed if spec.tie_word_embeddings else transport.export(read("lm_head.weight"))
        whole = {"embed": embed, "lm_head": lm_head}
    return layers, whole
