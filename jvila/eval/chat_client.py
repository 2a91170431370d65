"""A minimal OpenAI-compatible chat client (POST {base_url}/chat/completions) on the standard library.

MT-bench and SORRY-Bench talk to models this way: the model under test answers, and the judge grades. Any
OpenAI-compatible server works (ours by default: `jvila serve` listens on 127.0.0.1:8000). Busy or briefly
unreachable servers are retried a few times; a request the server refuses (wrong model name, bad key, a prompt
too long for its context) fails at once with the server's own message.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

log = logging.getLogger("jvila.eval")

# Retried: rate limiting and server-side failures. Anything else in 4xx is the request's fault.
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(ConnectionError):
    """The chat endpoint could not be reached or refused the request; the message says which and why."""


class ChatClient:
    """`chat(messages, temperature=..., max_tokens=...) -> str` against one endpoint and model."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 max_retries: int = 3, retry_wait_s: float = 2.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("a model name is needed for the chat endpoint")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._retry_wait_s = retry_wait_s

    def chat(self, messages: list[dict], *, temperature: float, max_tokens: int, seed: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                "n": 1}
        if seed is not None:
            body["seed"] = seed
        response = self._post(json.dumps(body).encode())
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url} answered without choices[0].message: {json.dumps(response)[:300]}") \
                from None
        # A model may end at once (an empty answer); OpenAI sends null content then.
        return content or ""

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self._max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in _RETRYABLE_STATUS or attempt == self._max_retries:
                    raise EndpointError(f"{self.url} refused the request for model {self.model!r}: "
                                        f"HTTP {e.code}: {message}") from None
                problem = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if attempt == self._max_retries:
                    raise EndpointError(f"cannot reach {self.url}: {reason}") from None
                problem = str(reason)
            except json.JSONDecodeError:
                raise EndpointError(f"{self.url} answered with something that is not JSON") from None
            wait = self._retry_wait_s * 2 ** attempt
            log.warning("%s: %s; retrying in %.0fs", self.url, problem, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def _error_message(error: urllib.error.HTTPError) -> str:
    """OpenAI's error body carries {"error": {"message": ...}}; other servers send text."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.strip()[:300] or str(error.reason)
