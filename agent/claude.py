"""The Claude proposer: one proposal = one fresh, bounded Messages API conversation with tool use.

The model reads the recipe and the history, edits its working copy of ``recipe.py`` through
the tools of ``agent.tools`` and submits; the loop stays in charge of everything else.

Control and failures:

- at most ``max_turns`` model replies per proposal and ``max_tokens`` output tokens per reply;
  a malformed or refused tool call gets an ``is_error`` result back and the conversation goes
  on; a reply without tool use, or running out of turns, ends the proposal without a
  submission (the loop records a ``no-op``);
- rate limits (429), overload (529), server errors and dropped connections are retried by the
  SDK (``sdk_retries``, exponential backoff honouring ``retry-after``), then by this module
  after a pause (``api_attempts`` × ``api_pause_s``, doubling); still failing, the proposal
  raises ``ProposerUnavailable``; authentication, permission and request errors raise
  ``ProposerStop`` at once: retrying cannot fix them, except a conversation grown past the
  context window ("prompt is too long"), which ends this proposal without a submission. So
  do a 429 for a spend limit, an error the server marks ``x-should-retry: false`` and a
  request that could not be sent (an illegal header: a key with a newline);
- every string sent is made valid UTF-8 first (``_encodable``): a lone surrogate in a run's
  reason or in the model's own reply would otherwise fail every later request; an empty
  reply ends the proposal (the API refuses an empty assistant turn);
- requests are not streamed, under the SDK's own timeout for that case (10 minutes), which
  also refuses a ``max_tokens`` whose reply could outlast it (``MAX_TOKENS``). A request that
  times out anyway is not tried again after the SDK's retries (``ProposerUnavailable``): a
  reply that never arrived reports no usage, so what it may have cost is not journaled;
- every reply's usage (input, output, cache write, cache read tokens) is priced
  (``agent.pricing``), reported through ``on_usage`` as it arrives and summed per proposal;
  the proposal stops after the reply that spends ``budget_usd`` (what is left under the
  loop's cap), so the cap can be exceeded by at most one reply; a reply cut off by
  ``max_tokens`` before any tool call gets one nudge to be brief, and a second such reply
  ends the proposal;
- the system prompt and tools carry one cache breakpoint, the conversation's last block a
  second, moving one: every turn after the first reads the earlier turns from the cache.

The API key is read by the SDK from ``ANTHROPIC_API_KEY``; this module never stores it, and
the loop strips it from the training subprocess's environment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import prompt
from agent.pricing import Usage, rates
from agent.runlog import map_strings
from agent.search import Proposal
from agent.tools import TOOLS, ToolBox

DEFAULT_MODEL = "claude-sonnet-5-5"
FAILED = ("crash", "diverged", "oom", "timeout", "error")  # statuses whose log tail the model sees
# The SDK refuses a non-streaming request it expects to take over 10 minutes, reckoning
# 128,000 output tokens an hour: max_tokens at most 128,000 × 600 / 3,600.
MAX_TOKENS = 21_333


class ProposerStop(Exception):
    """The loop must stop: an error no retry can fix (bad key, no permission, bad request)."""


class ProposerUnavailable(ProposerStop):
    """The API kept failing (rate limits, overload, server or connection errors) after retries."""


class ConversationTooLong(Exception):
    """The proposal's conversation outgrew the model's context: it ends without a submission
    (the next proposal starts a fresh one); not a reason to stop the study."""


@dataclass
class ClaudeConfig:
    model: str = DEFAULT_MODEL  # Messages API model id
    max_turns: int = 12  # model replies per proposal (each reply may call several tools)
    max_tokens: int = 8192  # output tokens per reply (adaptive thinking counts against it)
    sdk_retries: int = 4  # the SDK's own retries (exponential backoff, honours retry-after)
    api_attempts: int = 3  # further attempts after the SDK gives up, each after a pause
    api_pause_s: float = 30.0  # first pause between those attempts; doubles each time
    timeout_s: float | None = None  # per HTTP request; None: the SDK's for non-streaming requests (10 min)
    extra: dict = field(default_factory=dict)  # extra arguments for messages.create (e.g. thinking)


def _with_breakpoint(messages: list[dict]) -> list[dict]:
    """The messages with one cache breakpoint, on the last block of the last message: each
    turn then reads the conversation so far from the cache instead of paying for it again
    (the system prompt's breakpoint is the other one of the API's four)."""
    out = []
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        content = list(content)  # the stored messages never carry a breakpoint: only this copy does
        if i == len(messages) - 1 and content:
            content[-1] = dict(content[-1], cache_control={"type": "ephemeral"})
        out.append({"role": m["role"], "content": content})
    return out


def _block_dict(block) -> dict:
    """A response content block as the plain dict the next request sends back."""
    if isinstance(block, dict):
        return block
    return block.model_dump(mode="json", exclude_none=True, warnings=False)  # malformed input stays as sent


def _tool_results(box: ToolBox, uses: list[dict], content: list[dict], stop_reason: str | None) -> list[dict]:
    """One tool_result per tool call of a reply, in order, by running each in ``box``; a call
    the reply was cut off in (``max_tokens``) is refused, since its input may be truncated."""
    results = []
    for u in uses:
        if stop_reason == "max_tokens" and content[-1] is u:  # the block the cut fell in
            results.append({"type": "tool_result", "tool_use_id": u.get("id"), "is_error": True,
                            "content": "error: the reply hit max_tokens, so this call may be truncated and "
                                       "was not carried out; send it again, shorter"})
            box.calls.append({"tool": u.get("name"), "ok": False})
            continue
        text, is_error = box.run(u.get("name"), u.get("input"))
        results.append({"type": "tool_result", "tool_use_id": u.get("id"), "content": text,
                        **({"is_error": True} if is_error else {})})
    return results


def _encodable(value):
    """``value`` (a request's messages) with every string made valid UTF-8: a lone surrogate
    (a JSON escape in a run's reason, in the model's own reply) cannot be sent, and one in
    the journal's history would fail every later proposal of the study."""
    return map_strings(value, lambda text: text.encode("utf-8", "replace").decode("utf-8"))


# 429s that no pause fixes: the organisation's spend limit (SDK 2.14 and later)
NOT_TRANSIENT = ("EnforcedSpendLimitReachedError", "ContractSpendLimitReachedError")


def _never_retried(a, e) -> str | None:
    """Why the transient-looking error ``e`` must stop the loop at once, or None: a spend
    limit, a server that says not to retry (``x-should-retry: false``), or a request that
    could not even be sent (an illegal header value: a key with a newline, say)."""
    if any(isinstance(e, getattr(a, n)) for n in NOT_TRANSIENT if hasattr(a, n)):
        return f"the API's spend limit is reached ({e.status_code}); raise it, or wait for it to reset"
    response = getattr(e, "response", None)
    if response is not None and str(response.headers.get("x-should-retry", "")).lower() == "false":
        return f"the API refused the request ({e.status_code}) and said not to retry it"
    cause = e.__cause__ or e.__context__
    if isinstance(e, a.APIConnectionError) and type(cause).__name__ == "LocalProtocolError":
        # never the cause's text: an illegal header's value may be the key itself
        return "the request could not be sent (an illegal header value): check ANTHROPIC_API_KEY for spaces or newlines"
    return None


def _transient(a) -> tuple[type, ...]:
    """The SDK's errors worth a pause and another attempt once its own retries are spent:
    rate limits, server errors (529 overloaded among them), lost connections, and the 408
    and 409 the SDK itself retries (older SDKs lack some of these classes)."""
    names = ("RateLimitError", "InternalServerError", "APIConnectionError", "RequestTimeoutError", "ConflictError")
    return tuple(getattr(a, n) for n in names if hasattr(a, n))


class ClaudeProposer:
    def __init__(self, config: ClaudeConfig | None = None, client=None):
        import anthropic  # imported here: the search proposer needs no SDK

        self.anthropic = anthropic
        self.cfg = config or ClaudeConfig()
        # the key passed explicitly: the SDK then consults no profile or federation settings
        # (a timeout of our own would switch off the SDK's check of max_tokens against its timeout)
        timeout = {} if self.cfg.timeout_s is None else {"timeout": self.cfg.timeout_s}
        self.client = client or anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY"),
                                                    max_retries=self.cfg.sdk_retries, **timeout)
        self.system = prompt.system_blocks()  # the same for every call: built once, cached by the API
        _, known = rates(self.cfg.model)
        self.price_known = known
        # usage of the proposal under way, readable when it ends in an exception (the loop
        # journals what a cut-off proposal cost); None between proposals
        self.pending_usage: Usage | None = None

    # -- one API call, with the loop-level retry ---------------------------------------------
    def _create(self, messages: list[dict]):
        a = self.anthropic
        pause = self.cfg.api_pause_s
        for attempt in range(self.cfg.api_attempts + 1):
            try:
                return self.client.messages.create(
                    model=self.cfg.model, max_tokens=self.cfg.max_tokens, system=self.system,
                    tools=TOOLS, messages=_encodable(_with_breakpoint(messages)), **self.cfg.extra)
            except a.AuthenticationError as e:
                raise ProposerStop(f"authentication failed ({e.status_code}): check ANTHROPIC_API_KEY") from None
            except a.PermissionDeniedError as e:
                raise ProposerStop(f"permission denied ({e.status_code}) for model {self.cfg.model}") from None
            except a.APITimeoutError:  # each try may be a reply paid for and never seen: no more of them
                raise ProposerUnavailable(f"the API did not answer within the request timeout, "
                                          f"{self.cfg.sdk_retries + 1} times") from None
            except _transient(a) as e:
                if why := _never_retried(a, e):
                    raise ProposerStop(why) from None
                if attempt == self.cfg.api_attempts:
                    what = getattr(e, "status_code", None) or type(e).__name__
                    raise ProposerUnavailable(f"the API kept failing ({what}) after "
                                              f"{self.cfg.api_attempts + 1} attempts with retries") from None
                time.sleep(pause)
                pause *= 2
            except a.APIStatusError as e:  # 400, 404, 413, …: the request itself is wrong
                message = " ".join(str(getattr(e, "message", e)).split())[:200]
                if e.status_code == 400 and "prompt is too long" in message.lower():
                    raise ConversationTooLong(message) from None
                raise ProposerStop(f"the API refused the request ({e.status_code}): {message}") from None
            except a.APIError as e:  # e.g. a reply that does not parse: nothing a retry would fix
                raise ProposerStop(f"unusable API reply ({type(e).__name__}): "
                                   f"{' '.join(str(e).split())[:200]}") from None
        raise AssertionError("unreachable")

    # -- one proposal ----------------------------------------------------------------------
    def propose(self, source: str, history: list[dict], context: dict | None = None) -> Proposal:
        """``context``: ``workspace`` (Path), ``program`` (text), ``experiments`` (the journal's
        merged experiments), ``state`` (the loop's), ``session``, ``budget_usd``, optionally
        ``fix`` (the failed experiment being repaired) and ``on_usage(usage, cost)``, called
        after every reply."""
        ctx = context or {}
        exps = ctx.get("experiments", [])
        # "error": the harness refused the run after training (work past the budget, embeddings
        # that depend on the batch): recipe faults too, whose log says what happened
        tails = {e["n"]: (e.get("result") or {}).get("log_tail", "") for e in exps
                 if e.get("status") in FAILED and (e.get("result") or {}).get("log_tail")}
        summary = prompt.journal_summary(exps, ctx["state"], ctx.get("session", {}), tails)
        program = ctx.get("program", "")
        box = ToolBox(Path(ctx["workspace"]), source, program)
        messages = [{"role": "user", "content": prompt.proposal_message(program, source, summary, ctx.get("fix"))}]
        usage, reason, nudged = Usage(), None, False
        self.pending_usage = usage
        budget, on_usage = ctx.get("budget_usd"), ctx.get("on_usage")
        t0 = time.time()
        for _turn in range(self.cfg.max_turns):
            try:
                reply = self._create(messages)
            except ConversationTooLong:
                reason = "the conversation outgrew the model's context window"
                break
            usage.add_reply(reply.usage)
            if on_usage is not None:  # journaled per call, so a kill mid-proposal loses no spending
                one = Usage()
                one.add_reply(reply.usage)
                on_usage(one.to_dict(), one.cost_usd(self.cfg.model))
            content = [_block_dict(b) for b in reply.content]
            if not content:  # an empty assistant turn is a request the API refuses: nothing to go on with
                reason = f"the model's reply was empty (stop_reason {reply.stop_reason})"
                break
            messages.append({"role": "assistant", "content": content})
            uses = [b for b in content if b.get("type") == "tool_use"]
            if not uses and reply.stop_reason == "max_tokens" and not nudged:  # cut off while thinking
                nudged = True
                messages.append({"role": "user", "content": "Your reply reached max_tokens before any tool "
                                 "call. Be brief: make one edit and submit."})
            elif not uses:
                reason = (f"the model replied without using a tool (stop_reason {reply.stop_reason}"
                          f"{', after a nudge' if nudged and reply.stop_reason == 'max_tokens' else ''})")
                break
            else:
                messages.append({"role": "user", "content": _tool_results(box, uses, content, reply.stop_reason)})
                if box.submission is not None:
                    break
            if budget is not None and usage.cost_usd(self.cfg.model) >= budget:
                reason = "the cost cap was reached during the proposal"
                break
        else:
            reason = f"no submission within {self.cfg.max_turns} turns"
        self.pending_usage = None
        sub = box.submission
        return Proposal(
            source=box.source if sub else source,
            description=sub["description"] if sub else f"no-op: {reason}",
            hypothesis=sub["hypothesis"] if sub else "",
            changes={},
            extra={"usage": usage.to_dict(), "cost_usd": usage.cost_usd(self.cfg.model), "model": self.cfg.model,
                   "turns": sum(m["role"] == "assistant" for m in messages), "tool_calls": box.calls,
                   "expected_effect": sub.get("expected_effect", "") if sub else "", "reason": reason,
                   "edits": box.edits, "proposal_s": time.time() - t0},
            transcript=messages)
