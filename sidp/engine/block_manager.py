"""Paged KV bookkeeping: a free list of fixed-size blocks, per-sequence block tables, exact prefix caching.

A full block is registered under a hash of (parent hash, its tokens). A hit is accepted only when the
block's own tokens and its parent's identity (block id and generation) match too, so a hash collision
or a reused parent can never hand a sequence K/V computed for other tokens. Freed blocks keep their
contents and stay findable until the free list hands them out again (least recently freed first).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidp.engine.sequence import Sequence

ParentRef = tuple[int, int] | None  # (block id, generation) of the block before, None for the first


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()
    parent: ParentRef = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self.by_hash: dict[int, Block] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- admission with prefix lookup -------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """The longest run of cached full blocks at the start of seq, never the block of its last token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[Block] = []
        parent_hash, parent_ref = None, None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start : start + self.block_size])
            h = hash((parent_hash, tokens))
            block = self.by_hash.get(h)
            if block is None or block.tokens != tokens or block.parent != parent_ref:
                break
            hits.append(block)
            parent_hash, parent_ref = h, (block.block_id, block.generation)
        return hits

    def can_admit(self, seq: Sequence, hits: list[Block], num_new_tokens: int) -> bool:
        idle_hits = sum(1 for b in hits if b.ref_count == 0)
        fresh = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return fresh + idle_hits <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[Block]) -> None:
        for block in hits:
            if block.ref_count == 0:
                del self.free[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = seq.num_cached_prompt_tokens = len(hits) * self.block_size

    # --- growth and release ------------------------------------------------------------------------

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._take_free_block().block_id)

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail first, so prefixes outlive their suffixes
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def register_full_blocks(self, seq: Sequence, first_new_token: int) -> None:
        """Make the blocks that this step filled findable by later sequences with the same prefix."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first_block = first_new_token // bs
        full_blocks = seq.num_computed_tokens // bs
        if first_block >= full_blocks:
            return
        parent = self.blocks[seq.block_table[first_block - 1]] if first_block else None
        for index in range(first_block, full_blocks):
            block = self.blocks[seq.block_table[index]]
            tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
            parent_hash = parent.hash if parent else None
            if block.hash is None:
                block.hash = hash((parent_hash, tokens))
                block.tokens = tokens
                block.parent = (parent.block_id, parent.generation) if parent else None
                self.by_hash[block.hash] = block
            parent = block

    def _take_free_block(self) -> Block:
        block = self.blocks[next(iter(self.free))]
        del self.free[block.block_id]
        if block.hash is not None and self.by_hash.get(block.hash) is block:
            del self.by_hash[block.hash]
        block.hash, block.tokens, block.parent = None, (), None
        block.generation += 1
        block.ref_count = 1
        return block
