"""Long context: the RoPE-theta context-extension switch and a synthetic needle-in-a-haystack harness.

Context extension (LongVILA stage 4): raise RoPE's base theta with the new maximum length and
continue training briefly at that length. `extend_context` returns the config to train with;
`LONGVILA_THETAS` are the (length, theta) pairs of LongVILA's extension scripts
(NVlabs/VILA longvila/train/4_extend_llm_*.sh); without a theta, the NTK-aware rule scales it so
the longest wavelength stretches with the context: theta · s^(d / (d - 2)), s = new / old length.

Needle in a haystack: a distinctive key → value token sequence (the needle) is hidden at a depth
(fraction of the context) inside filler tokens; at the end the key is asked again and the model
must continue with the value. Scored teacher-forced: the fraction of value tokens that are the
argmax prediction. `niah_grid` sweeps lengths × depths with any `predict(tokens) -> logits`, e.g.
`functional.logits` on a sequence-parallel mesh, so it is usable on any trained model. Video
needles (a frame among frames) use `insert_needle_frame` on the frame array before encoding.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jvila.config import LLMConfig

# model_max_length -> rope_theta in LongVILA's context-extension scripts.
LONGVILA_THETAS = {131_072: 15_300_000.0, 262_144: 207_112_184.0, 524_288: 1_062_356_830.0,
                   1_048_576: 3_580_165_449.0}


def ntk_theta(theta: float, old_length: int, new_length: int, head_dim: int) -> float:
    """The NTK-aware base for a context `new_length / old_length` times longer."""
    if new_length <= 0 or old_length <= 0 or head_dim <= 2:
        raise ValueError(f"lengths must be positive and head_dim > 2, got {old_length}, {new_length}, {head_dim}")
    return float(theta * (new_length / old_length) ** (head_dim / (head_dim - 2)))


def extend_context(cfg: LLMConfig, max_position: int, *, theta: float | None = None) -> LLMConfig:
    """cfg with room for `max_position` tokens: RoPE theta raised (given, LongVILA's for that length,
    or NTK-aware from the current one) and `max_position_embeddings` set. Only the default RoPE kind
    is extended this way (scaled kinds already change the frequencies)."""
    if cfg.rope.kind != "default":
        raise ValueError(f"theta extension applies to the default RoPE, this model uses {cfg.rope.kind!r} scaling")
    if max_position <= cfg.max_position_embeddings and theta is None:
        raise ValueError(f"max_position {max_position} does not extend the current {cfg.max_position_embeddings}")
    if theta is None:
        theta = LONGVILA_THETAS.get(max_position) or ntk_theta(cfg.rope.theta, cfg.max_position_embeddings,
                                                                max_position, cfg.head_dim)
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    return dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, theta=float(theta)),
                               max_position_embeddings=int(max_position))


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    tokens: np.ndarray  # [length] int32: haystack with the needle, then the key again, then the value
    answer_positions: np.ndarray  # positions whose next-token predictions must be the value tokens
    answer: np.ndarray  # the value tokens
    needle_position: int


def make_needle_example(length: int, depth: float, *, vocab_size: int, key_len: int = 4, value_len: int = 4,
                        seed: int = 0, filler_vocab: int | None = None) -> NeedleExample:
    """A haystack of `length` tokens with the needle starting at `depth` (0 = first, 1 = last fit).

    Filler tokens come from [0, filler_vocab) and the needle from the rest of the vocabulary, so the
    key cannot occur by chance in the filler.
    """
    filler_vocab = filler_vocab or vocab_size // 2
    needle_len = key_len + value_len
    question_len = key_len + value_len
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the context in [0, 1], got {depth}")
    if length < needle_len + question_len + 1:
        raise ValueError(f"a context of {length} tokens cannot hold a {needle_len}-token needle and its question")
    if not 0 < filler_vocab < vocab_size - 1:
        raise ValueError(f"filler_vocab {filler_vocab} leaves no needle tokens in a vocabulary of {vocab_size}")
    rng = np.random.default_rng(seed)
    needle = rng.integers(filler_vocab, vocab_size, needle_len)
    key, value = needle[:key_len], needle[key_len:]
    haystack_len = length - question_len
    tokens = rng.integers(0, filler_vocab, length)
    start = int(round(depth * (haystack_len - needle_len)))
    tokens[start:start + needle_len] = needle
    tokens[haystack_len:haystack_len + key_len] = key
    tokens[haystack_len + key_len:] = value
    answer_positions = np.arange(haystack_len + key_len - 1, length - 1)
    return NeedleExample(tokens.astype(np.int32), answer_positions, value.astype(np.int32), start)


def needle_accuracy(predict, example: NeedleExample) -> float:
    """Fraction of the value tokens predicted (argmax, teacher-forced) by predict(tokens [1, L]) -> logits."""
    logits = np.asarray(predict(jnp.asarray(example.tokens)[None]))[0]
    return float(np.mean(np.argmax(logits[example.answer_positions], axis=-1) == example.answer))


def niah_grid(predict, lengths, depths, *, vocab_size: int, seeds=(0,), **needle_kwargs) -> dict:
    """{(length, depth): mean accuracy over seeds} — the needle-in-a-haystack heat map."""
    return {(length, depth): float(np.mean([
        needle_accuracy(predict, make_needle_example(length, depth, vocab_size=vocab_size, seed=seed,
                                                     **needle_kwargs)) for seed in seeds]))
            for length in lengths for depth in depths}


def insert_needle_frame(frames, needle_frame, depth: float):
    """frames [F, ...] with `needle_frame` [...] inserted at depth · F (video NIAH); returns (frames, index)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the video in [0, 1], got {depth}")
    if needle_frame.shape != frames.shape[1:]:
        raise ValueError(f"needle frame {needle_frame.shape} does not match frames {frames.shape[1:]}")
    index = int(round(depth * frames.shape[0]))
    return jnp.concatenate([frames[:index], needle_frame[None], frames[index:]]), index
