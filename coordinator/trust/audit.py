"""Checks on every job an agent finished: did it report the usage it delivered, run at a speed its
model can, and produce sane output? Pure functions; each failed check is evidence against the agent
(:mod:`coordinator.trust.scores`), and billing follows the coordinator's own count.

- Usage honesty: the completion tokens reported must fit the text delivered. llama.cpp, vLLM and
  Ollama stream one token per delta, except that the byte tokens of a multi-byte character (an
  emoji, an accent) wait for each other; so a delta holds at most one token plus one per non-ASCII
  byte. A whole reply's tokens are bounded by its text's bytes (byte-level tokenizers never make a
  token of less than one byte). Tool calls are bounded by the bytes of their names and arguments
  plus an allowance per call for the template's markers. Only text inside ``choices[]`` counts.
  The prompt tokens reported must not exceed the request's bytes (plus the template allowance).
- Speed: tokens over the time from assignment to the end can never exceed what the hardware did, so
  an honest agent can never look faster than it is; the ceiling is generous per model size.
- Output: empty output marked ``stop``, one token repeated, invalid UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from coordinator.trust import scores as trust
from shared.protocol import Usage

# Reported completion tokens may exceed the tokens the text can hold by this factor plus slack before the
# report is called inflated.
USAGE_TOLERANCE = 1.25
USAGE_SLACK = 4
# Fewer tokens than this say nothing about speed (timer granularity, network bunching).
SPEED_MIN_TOKENS = 16
# Single-stream decoding speed no hardware reaches: a bound from memory bandwidth per parameter,
# capped for tiny models whose speed is bound by per-token overheads.
SPEED_BANDWIDTH = 2e13  # tokens/s x parameters
SPEED_CAP = 5000.0  # tokens/s
REPEAT_MIN_WORDS = 12
UNBILLED = frozenset({trust.BAD_OUTPUT, trust.IMPLAUSIBLE_SPEED})
REPLACEMENT_SHARE = 0.25
TEXT_KEPT = 64 * 1024  # characters of output kept for the sanity checks
# Tokens a tool call's syntax may take beyond its name and arguments (the template's markers).
TOOL_CALL_ALLOWANCE = 32


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    text: str | None = None  # a text completion's
    finish_reason: str | None = None


class _Payload(msgspec.Struct):
    choices: list[_StreamChoice] = []


_payload = msgspec.json.Decoder(_Payload)
_ASCII = bytes(range(128))


def _non_ascii(text: str) -> int:
    """Bytes of ``text``'s UTF-8 form above 0x7F (in C: no loop over bytes in Python)."""
    return 0 if text.isascii() else len(text.encode().translate(None, _ASCII))


@dataclass
class Output:
    """What a job produced, read one payload (a stream chunk or a whole reply) at a time as it is
    relayed. Only text inside ``choices[].delta`` / ``choices[].message`` counts: content,
    reasoning, refusal and tool calls. Work and memory are O(output): each payload is decoded once,
    and at most ``TEXT_KEPT`` characters of text are kept for the sanity checks."""

    stream: bool = False  # payloads are stream chunks (a completion's text is one token per chunk then)
    tool_calls: int = 0  # tool calls begun (a name seen)
    finish_reason: str | None = None
    valid: bool = True  # every payload was valid UTF-8 JSON
    deltas: int = 0  # payload parts that carried output: at least one token each (a lower bound)
    token_bound: int = 0  # the most tokens the output can be: see the module's docstring
    _parts: list[str] = field(default_factory=list)
    _kept: int = 0

    def read(self, payload: bytes) -> int:
        """Count one payload; returns how many of its parts carried output (the tokens it
        certainly holds)."""
        try:
            decoded = _payload.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):  # the consumer could not read it either
            self.valid = False
            return 0
        carried = 0
        for choice in decoded.choices:
            if choice.text:  # a text completion: its text is the output
                carried += 1
                self._keep(choice.text)
                extra = _non_ascii(choice.text)
                self.token_bound += 1 + extra if self.stream else len(choice.text) + extra
            streamed = choice.delta is not None
            part = choice.delta if streamed else choice.message
            if part is not None:
                for text in (part.reasoning_content, part.content, part.refusal):
                    if text:
                        carried += 1
                        self._keep(text)
                        # A streamed delta is one token, or the bytes of one character that span
                        # several; a whole reply is bounded by its bytes.
                        self.token_bound += 1 + _non_ascii(text) if streamed else len(text) + _non_ascii(text)
                for call in part.tool_calls or ():
                    function = call.function
                    if function is None:
                        continue
                    if function.name:
                        self.tool_calls += 1
                        self.token_bound += TOOL_CALL_ALLOWANCE + len(function.name)
                    if function.arguments:
                        carried += 1
                        arguments = function.arguments
                        self.token_bound += len(arguments) + _non_ascii(arguments)
            self.finish_reason = choice.finish_reason or self.finish_reason
        self.deltas += carried
        return carried

    def _keep(self, text: str) -> None:
        if self._kept < TEXT_KEPT:
            piece = text[: TEXT_KEPT - self._kept]
            self._parts.append(piece)
            self._kept += len(piece)

    @property
    def text(self) -> str:
        """The output's text (its first ``TEXT_KEPT`` characters)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def read_output(payloads: list[bytes]) -> Output:
    output = Output()
    for payload in payloads:
        output.read(payload)
    return output


@dataclass(frozen=True)
class Finished:
    """What the coordinator saw of one completed job."""

    stream: bool
    delivered: int  # text deltas counted (streams)
    reported: Usage | None
    output: Output
    seconds: float  # from assignment to the end
    parameter_count: int | None
    prompt_bound: int | None = None  # the most prompt tokens the request can be (None: not checked)
    prompt_estimate: int = 0  # what to bill for the prompt when the report cannot be believed


@dataclass
class Verdict:
    findings: list[tuple[str, str]] = field(default_factory=list)  # (evidence kind, detail)
    completion_tokens: int | None = None  # what to bill instead of the report, when it was inflated
    prompt_tokens: int | None = None  # likewise for the prompt

    @property
    def billable(self) -> bool:
        """Garbage, and output faster than the model can make (so not the model's), are not billed."""
        return all(kind not in UNBILLED for kind, _ in self.findings)


def speed_ceiling(parameter_count: int | None) -> float:
    if not parameter_count:
        return SPEED_CAP
    return min(SPEED_CAP, SPEED_BANDWIDTH / parameter_count)


def counted_tokens(job: Finished) -> int:
    """The most completion tokens the coordinator can vouch for."""
    return max(job.delivered, job.output.token_bound)


def judge(job: Finished) -> Verdict:
    verdict = Verdict()
    output = job.output
    counted = counted_tokens(job)
    reported = job.reported.completion_tokens if job.reported is not None else None
    if reported is not None and reported > counted * USAGE_TOLERANCE + USAGE_SLACK:
        verdict.findings.append((trust.USAGE_INFLATED, f"reported {reported} completion tokens, counted {counted}"))
        verdict.completion_tokens = counted
    prompt = job.reported.prompt_tokens if job.reported is not None else None
    if prompt is not None and job.prompt_bound is not None and prompt > job.prompt_bound:
        verdict.findings.append(
            (trust.USAGE_INFLATED, f"reported {prompt} prompt tokens, the request holds at most {job.prompt_bound}")
        )
        verdict.prompt_tokens = job.prompt_estimate
    tokens = min(reported, counted) if reported is not None and not job.stream else job.delivered
    ceiling = speed_ceiling(job.parameter_count)
    if tokens >= SPEED_MIN_TOKENS and job.seconds > 0 and tokens / job.seconds > ceiling:
        verdict.findings.append(
            (trust.IMPLAUSIBLE_SPEED, f"{tokens / job.seconds:.0f} tokens/s, ceiling {ceiling:.0f} for this model")
        )
    problem = bad_output(output)
    if problem is not None:
        verdict.findings.append((trust.BAD_OUTPUT, problem))
    return verdict


def bad_output(output: Output) -> str | None:
    """Why the output is not a sane answer, or ``None``."""
    if not output.valid:
        return "invalid UTF-8 or JSON in the output"
    text = output.text
    if not text.strip() and not output.tool_calls and output.finish_reason == "stop":
        return "empty output marked stop"
    if text and text.count("\ufffd") / len(text) >= REPLACEMENT_SHARE:
        return "output is mostly replacement characters (invalid UTF-8)"
    words = text.split()
    if len(words) >= REPEAT_MIN_WORDS and len(set(words)) == 1:
        return f"one token repeated {len(words)} times"
    stripped = text.strip()
    if len(stripped) >= 4 * REPEAT_MIN_WORDS and len(set(stripped)) == 1:
        return "one character repeated"
    return None
