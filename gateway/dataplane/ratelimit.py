"""Token buckets for a route's rate_limit, one per client (its address, or a header's
value), kept for the most recently seen clients only. Pure: the caller gives the time.

Each bucket holds up to ``burst`` tokens and gains ``average`` a second; a request
takes one. A bucket that has not been used for long is full again, so forgetting it
(the least recently used go first, past ``max_keys``) changes nothing for its client
unless the table is full of busier ones.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

MAX_KEYS: Final = 100_000


class TokenBuckets:
    def __init__(self, average: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self.average = average
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()  # key -> [tokens, at]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: bytes, now: float) -> float:
        """0.0 when ``key`` may go now (a token is taken), else the seconds until it may."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            buckets[key] = [self.burst - 1.0, now]
            return 0.0
        buckets.move_to_end(key)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.average)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.average
