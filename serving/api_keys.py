"""API keys: who is calling, for authentication and for fairness.

The keys file is JSON mapping each key to its client name and an optional fairness weight:

    {"sk-alice-1": {"client": "alice", "weight": 2.0}, "sk-bob": {"client": "bob"}}

Several keys may name one client (they share its fair share). Weights default to 1 and feed the
weighted VTC scheduler, so a client of weight 2 is served twice the tokens of a weight-1 client.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import pathlib


@dataclasses.dataclass(frozen=True)
class Client:
    name: str
    weight: float = 1.0


class ApiKeys:
    def __init__(self, keys: dict[str, Client]):
        if not keys:
            raise ValueError("an API keys table needs at least one key")
        weights: dict[str, float] = {}
        for key, client in keys.items():
            if not key:
                raise ValueError("API keys must not be empty")
            if not client.weight > 0:
                raise ValueError(f"client {client.name!r} has weight {client.weight}; weights must be positive")
            if weights.setdefault(client.name, client.weight) != client.weight:
                raise ValueError(f"client {client.name!r} is given two different weights")
        self._keys = dict(keys)
        self.weights = weights

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ApiKeys:
        path = pathlib.Path(path)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"API keys file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"API keys file {path} is not valid JSON: {e}") from None
        return cls.from_dict(table, source=str(path))

    @classmethod
    def from_dict(cls, table, *, source: str = "API keys") -> ApiKeys:
        if not isinstance(table, dict):
            raise ValueError(f"{source}: expected a JSON object mapping keys to {{'client': ..., 'weight': ...}}")
        keys = {}
        for key, entry in table.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("client"), str) or not entry["client"]:
                raise ValueError(f"{source}: key {key[:6]}... needs a non-empty 'client' name")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"{source}: the weight of client {entry['client']!r} must be a number")
            keys[key] = Client(entry["client"], float(weight))
        return cls(keys)

    def client_for(self, key: str | None) -> Client | None:
        """The key's client, or None for a missing or unknown key."""
        if not key:
            return None
        # Constant-time comparison against every key: the answer time does not reveal a key's prefix.
        found = None
        for known, client in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = client
        return found

    def __len__(self) -> int:
        return len(self._keys)
