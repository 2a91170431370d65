"""Packs one step's rows (sequence, tokens to feed) into the device step's `StepBatch`.

Tokens of all rows go back to back: row b's are `cu_q_lens[b]:cu_q_lens[b + 1]`, continuing the
`context_lens[b]` tokens its pages already hold. Media rows bring their embeddings. Each row carries its
request's sampling settings, and the index of the output token it would sample, so that a
seeded request's draws do not depend on what else shares the step (or on a preemption).
"""

from __future__ import annotations

import numpy as np

from serving.sequence import Sequence
from serving.step import StepBatch


def pack_step(plan: list[tuple[Sequence, int]], allocator, hidden_size: int) -> StepBatch:
    num_rows = len(plan)
    num_tokens = sum(chunk for _, chunk in plan)
    token_ids = np.zeros((num_tokens,), np.int32)
    cu_q_lens = np.zeros((num_rows + 1,), np.int32)
    context_lens = np.zeros((num_rows,), np.int32)
    tables = [allocator.page_table(seq.request_id) for seq, _ in plan]
    page_table = np.zeros((num_rows, max(len(t) for t in tables)), np.int32)
    embeddings = mask = None
    for row, (seq, chunk) in enumerate(plan):
        start, stop = cu_q_lens[row], cu_q_lens[row] + chunk
        cu_q_lens[row + 1] = stop
        first = seq.num_computed
        token_ids[start:stop] = seq.tokens[first: first + chunk]
        context_lens[row] = first
        page_table[row, : len(tables[row])] = tables[row]
        media = seq.media_rows(first, first + chunk)
        if media is not None:
            if embeddings is None:
                embeddings = np.zeros((num_tokens, hidden_size), np.float32)
                mask = np.zeros((num_tokens,), bool)
            embeddings[start:stop], mask[start:stop] = media
    params = [seq.request.params for seq, _ in plan]
    return StepBatch(
        token_ids=token_ids,
        cu_q_lens=cu_q_lens,
        context_lens=context_lens,
        page_table=page_table,
        temperature=np.asarray([p.temperature for p in params], np.float32),
        top_k=np.asarray([p.top_k for p in params], np.int32),
        top_p=np.asarray([p.top_p for p in params], np.float32),
        seeds=np.asarray([seq.seed for seq, _ in plan], np.int64),
        output_index=np.asarray([seq.num_output for seq, _ in plan], np.int32),
        num_logprobs=max((p.logprobs or 0) for p in params),
        input_embeddings=embeddings,
        embedding_mask=mask,
    )
