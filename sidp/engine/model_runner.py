"""ModelRunner: turns a scheduled step into tensors, runs the decoder over the paged cache, samples.

Rows are laid out decode sequences first (one token each, served by the paged decode kernel), then
prefill chunks. Logits are computed only for the last row of each sequence that completes its
known tokens this step; a prompt chunk that stops short of the end samples nothing.
"""

from __future__ import annotations

import torch

from sidp.engine.scheduler import ScheduledStep
from sidp.engine.sequence import Sequence
from sidp.model.attention import AttentionBatch, PrefillChunk
from sidp.model.decoder import Decoder
from sidp.model.kv_cache import new_kv_cache
from sidp.model.sampler import sample


class ModelRunner:
    def __init__(
        self, model: Decoder, num_blocks: int, block_size: int, dtype: torch.dtype, device: str = "cpu"
    ):
        spec = model.spec
        self.model = model
        self.block_size = block_size
        self.device = device
        shapes = (num_blocks, block_size, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [new_kv_cache(*shapes, dtype, device) for _ in range(spec.num_layers)]

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[int | None]:
        """The sampled token of each scheduled sequence (None where its prompt is still being read)."""
        order = sorted(range(len(step.seqs)), key=lambda i: step.num_new_tokens[i] > 1)
        seqs = [step.seqs[i] for i in order]
        input_ids, batch, sample_rows = self._prepare(seqs, [step.num_new_tokens[i] for i in order])
        hidden = self.model(input_ids, batch, self.kv_caches)
        picked = [k for k, row in enumerate(sample_rows) if row is not None]
        tokens: list[int | None] = [None] * len(seqs)
        if picked:
            logits = self.model.logits(hidden[[sample_rows[k] for k in picked]])
            drawn = sample(logits, [seqs[k].params for k in picked], [seqs[k].generator for k in picked])
            for k, token in zip(picked, drawn, strict=True):
                tokens[order[k]] = token
        return tokens

    def _prepare(self, seqs: list[Sequence], counts: list[int]):
        num_decode = sum(1 for n in counts if n == 1)
        decode_seqs, prefill_seqs = seqs[:num_decode], seqs[num_decode:]
        # Decode rows are built from plain ints: tensor ops per sequence would cost more than the math.
        bs = self.block_size
        starts = [s.num_computed_tokens for s in decode_seqs]
        ids = [s.token_ids[p] for s, p in zip(decode_seqs, starts, strict=True)]
        positions = [torch.tensor(starts, dtype=torch.int64)]
        slots = [
            torch.tensor(
                [s.block_table[p // bs] * bs + p % bs for s, p in zip(decode_seqs, starts, strict=True)],
                dtype=torch.int64,
            )
        ]
        sample_rows: list[int | None] = [
            row if s.num_tokens == p + 1 else None
            for row, (s, p) in enumerate(zip(decode_seqs, starts, strict=True))
        ]
        width = max((len(s.block_table) for s in decode_seqs), default=0)
        tables = torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in decode_seqs], dtype=torch.int32
        ).view(num_decode, width)
        prefills: list[PrefillChunk] = []
        row = num_decode
        for seq, n in zip(prefill_seqs, counts[num_decode:], strict=True):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start : start + n]
            pos = torch.arange(start, start + n)
            context = torch.arange(start + n) if start else pos
            context_slots = torch.tensor(seq.block_table)[context // bs] * bs + context % bs
            positions.append(pos)
            slots.append(context_slots[start:])
            if start:
                prefills.append(PrefillChunk(row, row + n, context_slots, context[None, :] <= pos[:, None]))
            else:
                prefills.append(PrefillChunk(row, row + n, None, None))
            sample_rows.append(row + n - 1 if start + n == seq.num_tokens else None)
            row += n
        batch = AttentionBatch(
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slots),
            num_decode=num_decode,
            decode_block_tables=tables,
            decode_context_lens=torch.tensor([p + 1 for p in starts], dtype=torch.int32),
            prefills=prefills,
        )
        return torch.tensor(ids).to(self.device), batch.to(self.device), sample_rows
