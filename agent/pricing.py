"""Token usage and its dollar cost, per Messages API call and summed.

Prices are USD per million tokens, from Anthropic's published pricing (October 2026):
base input, output, 5-minute cache writes and cache reads (hits and refreshes). The loop
caps spending with ``--max-cost-usd``, so an unknown model id is priced at the most
expensive rates in the table (the cap then stops the loop early, never late) and a
warning says so. Update the table when prices change; the journal keeps each call's
token counts, so costs can be recomputed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# model id prefix -> (input, output, cache write 5m, cache read), USD per MTok
PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-fable-5": (10.0, 50.0, 12.5, 1.0),  # 5.1 and later read cache at 0.25: priced high
    "claude-mythos-5": (10.0, 50.0, 12.5, 1.0),
    "claude-opus-5-5": (4.0, 20.0, 5.0, 0.2),
    "claude-opus-5": (5.0, 25.0, 6.25, 0.5),
    "claude-opus-4": (5.0, 25.0, 6.25, 0.5),  # 4.5 to 4.8; 4.0 and 4.1 are retired
    "claude-sonnet-5-5": (2.0, 10.0, 2.5, 0.1),  # cache reads cut from 0.20 on 2026-10-07
    "claude-sonnet-5": (2.0, 10.0, 2.5, 0.2),
    "claude-sonnet-4": (3.0, 15.0, 3.75, 0.3),
    "claude-haiku-5-5": (0.1, 0.5, 0.125, 0.01),  # prompts up to 100k tokens (ours are ~10k)
    "claude-haiku-4": (1.0, 5.0, 1.25, 0.1),
}


def rates(model: str) -> tuple[tuple[float, float, float, float], bool]:
    """(rates, known) for a model id: the longest matching prefix, else the dearest rates."""
    matches = [p for p in PRICES if model.startswith(p)]
    if matches:
        return PRICES[max(matches, key=len)], True
    return tuple(max(r[i] for r in PRICES.values()) for i in range(4)), False  # type: ignore[return-value]


@dataclass
class Usage:
    calls: int = 0  # Messages API calls that returned a reply
    input_tokens: int = 0  # uncached input
    output_tokens: int = 0
    cache_write_tokens: int = 0  # cache_creation_input_tokens
    cache_read_tokens: int = 0  # cache_read_input_tokens

    def add_reply(self, usage) -> None:
        """Add one reply's ``usage`` (the SDK's object or a dict; missing fields count 0,
        and a count that is no number, negative or beyond ``MAX_TOKENS_A_REPLY`` is read as
        0 or that bound: a negative count would lower the spending the cost cap sees)."""
        get = usage.get if isinstance(usage, dict) else (lambda k, d=None: getattr(usage, k, d))
        self.calls += 1
        self.input_tokens += _count(get("input_tokens", 0))
        self.output_tokens += _count(get("output_tokens", 0))
        self.cache_write_tokens += _count(get("cache_creation_input_tokens", 0))
        self.cache_read_tokens += _count(get("cache_read_input_tokens", 0))

    def cost_usd(self, model: str) -> float:
        (p_in, p_out, p_cw, p_cr), _ = rates(model)
        return (self.input_tokens * p_in + self.output_tokens * p_out + self.cache_write_tokens * p_cw
                + self.cache_read_tokens * p_cr) / 1e6

    def to_dict(self) -> dict:
        return asdict(self)


MAX_TOKENS_A_REPLY = 10**9  # far beyond any model's context: a count past it is a broken reply


def _count(value) -> int:
    """A token count as ``add_reply`` adds it: an int in 0..MAX_TOKENS_A_REPLY."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        return 0
    return int(min(max(value, 0), MAX_TOKENS_A_REPLY))
