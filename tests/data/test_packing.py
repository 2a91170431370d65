"""Packing invariants: no token lost, segments never cross, positions restart, shifted targets, images in order."""

import numpy as np
import pytest

from jvila.data.packing import Example, RowPacker, pack_examples

TILE = (5, 3, 3)  # a tile shape that is not square: catches swapped axes


def _examples(rng, count, max_len, max_images):
    out = []
    for i in range(count):
        n = int(rng.integers(1, max_len + 1))
        m = int(rng.integers(0, max_images + 1))
        images = rng.standard_normal((m, *TILE)).astype(np.float32) if m else None
        out.append(Example(rng.integers(1, 1000, n).astype(np.int32), rng.integers(0, 2, n).astype(np.int32),
                           images, f"ex{i}"))
    return out


def _segments(batch):
    """(row, segment id, slice) of every packed sequence, read back from segment_ids alone."""
    for row, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a segment is not contiguous"
            yield row, int(s), slice(where[0], where[-1] + 1)


@pytest.mark.parametrize("rows, length, max_images", [(3, 37, 2), (1, 50, 0), (4, 13, 3)])
def test_packing_invariants(rows, length, max_images):
    rng = np.random.default_rng()
    examples = _examples(rng, 40, length + 6, max_images + 1)  # some too long, some with too many images
    batches, skipped = pack_examples(examples, rows, length, max_images=max_images,
                                     image_shape=TILE if max_images else None, pad_id=-7)
    too_long = [e for e in examples if len(e.tokens) > length]
    too_many = [e for e in examples if len(e.tokens) <= length and e.num_images > max_images]
    assert [e.record_id for e, _ in skipped] == [e.record_id for e in examples if e in too_long or e in too_many]
    assert {r for _, r in skipped} <= {"too_long", "too_many_images"}
    kept = [e for e in examples if e not in too_long and e not in too_many]

    found = []  # (example tokens, its images) in the order packed: batch, row, segment
    for batch in batches:
        assert batch["tokens"].shape == (rows, length) and batch["tokens"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        pad = batch["segment_ids"] == 0
        assert np.all(batch["tokens"][pad] == -7) and np.all(batch["positions"][pad] == 0)
        assert np.all(batch["weights"][pad] == 0) and np.all(batch["targets"][pad] == 0)
        image_slot = {}
        for row, s, sl in _segments(batch):
            tokens = batch["tokens"][row, sl]
            np.testing.assert_array_equal(batch["positions"][row, sl], np.arange(len(tokens)))
            np.testing.assert_array_equal(batch["targets"][row, sl][:-1], tokens[1:])
            assert batch["weights"][row, sl][-1] == 0 and batch["targets"][row, sl][-1] == 0
            example = next(e for e in kept if np.array_equal(e.tokens, tokens) and id(e) not in {id(f) for f, _ in found})
            np.testing.assert_array_equal(batch["weights"][row, sl][:-1], example.loss_mask[1:])
            slot = image_slot.get(row, 0)
            if max_images:
                np.testing.assert_array_equal(batch["images"][row, slot:slot + example.num_images],
                                              example.images if example.num_images else np.zeros((0, *TILE)))
            image_slot[row] = slot + example.num_images
            found.append((example, row))
        if max_images:
            for row in range(rows):
                assert not batch["images"][row, image_slot.get(row, 0):].any(), "unused image slots are zeros"
    # Every packable example exactly once; no token lost.
    assert sorted(id(e) for e, _ in found) == sorted(id(e) for e in kept)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == sum(len(e.tokens) for e in kept)


def test_first_fit_is_deterministic_and_fills_earlier_rows_first():
    lengths = [6, 7, 3, 4, 2, 9]
    examples = [Example(np.arange(1, n + 1, dtype=np.int32), np.ones(n, np.int32), None, str(i))
                for i, n in enumerate(lengths)]
    batches, _ = pack_examples(examples, rows=2, length=10)
    # 6 -> row 0; 7 -> row 1; 3 -> row 0 (9 used); 4 fits no row: the batch closes; 4, 2 -> row 0; 9 -> row 1.
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["segment_ids"], [[1] * 6 + [2] * 3 + [0], [1] * 7 + [0] * 3])
    np.testing.assert_array_equal(batches[1]["segment_ids"], [[1] * 4 + [2] * 2 + [0] * 4, [1] * 9 + [0]])
    again, _ = pack_examples(examples, rows=2, length=10)
    for a, b in zip(batches, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_packer_arguments_and_mismatched_tiles():
    with pytest.raises(ValueError, match="at least one row"):
        RowPacker(0, 8)
    packer = RowPacker(1, 8, max_images=2, image_shape=TILE)
    packer.add(Example(np.ones(3, np.int32), np.ones(3, np.int32), np.ones((1, 4, 4, 3), np.float32), "x"), 0)
    with pytest.raises(ValueError, match="image tiles of shape"):
        packer.batch()
    text_only = RowPacker(1, 8)
    with pytest.raises(ValueError, match="text only"):
        text_only.add(Example(np.ones(3, np.int32), np.ones(3, np.int32), np.ones((1, *TILE), np.float32), "y"), 0)
