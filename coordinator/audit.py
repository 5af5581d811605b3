"""Checks on every job an agent finished: did it report the usage it delivered, run at a speed its
model can, and produce sane output? Pure functions; each failed check is evidence against the agent
(:mod:`coordinator.trust`), and billing follows the coordinator's own count.

- Usage honesty: the completion tokens reported must fit the text delivered. llama.cpp, vLLM and
  Ollama stream one token per delta, except that the byte tokens of a multi-byte character (an
  emoji, an accent) wait for each other; so a delta holds at most one token plus one per non-ASCII
  byte. A whole reply's tokens are bounded by its text's bytes (byte-level tokenizers never make a
  token of less than one byte).
- Speed: tokens over the time from assignment to the end can never exceed what the hardware did, so
  an honest agent can never look faster than it is; the ceiling is generous per model size.
- Output: empty output marked ``stop``, one token repeated, invalid UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from coordinator import trust
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


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[object] | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    finish_reason: str | None = None


class _Payload(msgspec.Struct):
    choices: list[_StreamChoice] = []


_payload = msgspec.json.Decoder(_Payload)


@dataclass
class Output:
    """The text a job produced, read out of its stream chunks or its whole reply."""

    text: str = ""
    tool_calls: bool = False
    finish_reason: str | None = None
    valid: bool = True  # every payload was valid UTF-8 JSON
    token_bound: int = 0  # the most tokens the text can be: see the module's docstring

    def read(self, payload: bytes) -> None:
        try:
            decoded = _payload.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):  # the consumer could not read it either
            self.valid = False
            return
        for choice in decoded.choices:
            part = choice.delta or choice.message
            if part is not None:
                content = (part.reasoning_content or "") + (part.content or "")
                self.text += content
                self.tool_calls = self.tool_calls or bool(part.tool_calls)
                if content and choice.delta is not None:
                    self.token_bound += 1 + sum(1 for byte in content.encode() if byte > 0x7F)
                elif content:
                    self.token_bound += len(content.encode())
            self.finish_reason = choice.finish_reason or self.finish_reason


def read_output(payloads: list[bytes]) -> Output:
    output = Output()
    for payload in payloads:
        output.read(payload)
    return output


@dataclass(frozen=True)
class Job:
    """What the coordinator saw of one completed job."""

    stream: bool
    delivered: int  # text deltas counted (streams)
    reported: Usage | None
    output: Output
    seconds: float  # from assignment to the end
    parameter_count: int | None


@dataclass
class Verdict:
    findings: list[tuple[str, str]] = field(default_factory=list)  # (evidence kind, detail)
    completion_tokens: int | None = None  # what to bill instead of the report, when it was inflated

    @property
    def billable(self) -> bool:
        """Garbage, and output faster than the model can make (so not the model's), are not billed."""
        return all(kind not in UNBILLED for kind, _ in self.findings)


def speed_ceiling(parameter_count: int | None) -> float:
    if not parameter_count:
        return SPEED_CAP
    return min(SPEED_CAP, SPEED_BANDWIDTH / parameter_count)


def counted_tokens(job: Job) -> int:
    """The most completion tokens the coordinator can vouch for."""
    return max(job.delivered, job.output.token_bound)


def judge(job: Job) -> Verdict:
    verdict = Verdict()
    output = job.output
    counted = counted_tokens(job)
    reported = job.reported.completion_tokens if job.reported is not None else None
    if reported is not None and reported > counted * USAGE_TOLERANCE + USAGE_SLACK and not output.tool_calls:
        verdict.findings.append((trust.USAGE_INFLATED, f"reported {reported} completion tokens, counted {counted}"))
        verdict.completion_tokens = counted
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
