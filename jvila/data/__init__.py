"""Training data: VILA/LLaVA conversation records -> tokenized, label-masked, packed batches (Grain).

- `records`: read and validate JSON-lines / JSON records.
- `conversation`: one record -> token ids and the assistant-only loss mask, media expanded.
- `packing`: examples -> fixed-length rows (tokens, targets, weights, positions, segment_ids, images, videos).
- `video_examples`: a record's videos -> frames and token counts, as the inference prompt builder makes them.
- `pipeline`: `DataConfig` and `build_train_iterator` (shuffle, per-process shards, workers, state).
- `demo_shapes`: the embedded coloured-shapes demo dataset and its tokenizer.
"""
