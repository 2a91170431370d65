"""Serving many LoRA adapters at once (S-LoRA): a host store, residency in the KV page pool, per-step gathering."""
