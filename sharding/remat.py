"""Rematerialisation policies for the train step, LightSeq's among them.

Checkpointing a decoder layer keeps only its input and recomputes the rest in the backward pass.
Done naively that recomputes the attention forward — for ring attention a whole extra round of
K/V transfers and block computations, the most expensive part of the layer. LightSeq's
rematerialisation-aware checkpointing keeps the attention output and its log-sum-exp instead:
those (with q, k, v, cheap to recompute from the layer input) are all the attention backward
needs, so the recompute stops at the attention. Here that is a `jax.checkpoint` policy saving
the names `sharding.ring_attention` gives its output and lse.

Policies: "none" (no rematerialisation), "full" (save nothing), "lightseq" (save attention output
and lse), "dots" (JAX's dots-without-batch-dims policy, for comparison).
"""

from __future__ import annotations

import jax

from sharding.ring_attention import ATTENTION_LSE, ATTENTION_OUT

POLICIES = ("none", "full", "lightseq", "dots")


def remat_policy(name: str):
    """The `jax.checkpoint` policy called `name` (None for "none")."""
    if name not in POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {POLICIES}")
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "lightseq": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE),
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


def rematerialized(fn, policy: str):
    """fn wrapped in `jax.checkpoint` with the named policy (fn itself for "none")."""
    if policy == "none":
        remat_policy(policy)
        return fn
    return jax.checkpoint(fn, policy=remat_policy(policy))
