"""Data protection for prompts that go to strangers' GPUs: detectors for secrets, payment cards,
IBANs, e-mail addresses and phone numbers, and the redaction that replaces what they find with a
typed placeholder (``[EMAIL_1]``) before the prompt leaves the coordinator. Pure: text in, findings
and text out.

Each detector is a cheap regular expression for candidates, then a check that rules out what only
looks alike: the Luhn checksum for cards and the IBAN checksum (``python-stdnum``), a real numbering
plan for phone numbers (``phonenumbers``; only international ``+…`` numbers, as a local number is
any run of digits). Nothing is downloaded or learnt at run time. Findings are counted by detector;
the matched text is never logged or stored.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban, luhn

SECRET, CARD, IBAN, EMAIL, PHONE = "secret", "card", "iban", "email", "phone"
DETECTORS = (SECRET, CARD, IBAN, EMAIL, PHONE)
BLOCK, REDACT, PRIVATE = "block", "redact", "private"
ACTIONS = (BLOCK, REDACT, PRIVATE)

# Each secret format with the literal it must contain: a format whose literal is absent is not
# searched for at all (a plain ``in`` is far cheaper than a regular expression over the prompt).
_SECRETS = tuple(
    (literal, re.compile(pattern))
    for literal, pattern in (
        ("PRIVATE KEY-----", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"),
        ("eyJ", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # a JWT
        ("k_live_", r"\b[sr]k_live_[A-Za-z0-9]{16,}"),  # Stripe
        ("k_test_", r"\b[sr]k_test_[A-Za-z0-9]{16,}"),
        ("sk-", r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI, Anthropic
        ("AKIA", r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
        ("ASIA", r"\bASIA[0-9A-Z]{16}\b"),
        ("_", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}"),  # GitHub
        ("xox", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),  # Slack
        ("AIza", r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
        ("glpat-", r"\bglpat-[A-Za-z0-9_-]{20,}"),  # GitLab
        ("pool_", r"\bpool_(?:live|agent)_[A-Za-z0-9_-]{20,}"),  # this pool's own keys and tokens
        ("://", r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:[^\s@/]{1,128}@[^\s/]+"),  # a password in a URL
    )
)
_CARDS = re.compile(r"\d(?:[ -]?\d){12,18}")  # its edges are checked in Python: faster than lookarounds
_IBANS = re.compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}")
# (not git's scp-like remotes, git@github.com:owner/repo, where a path follows the colon at once)
_EMAILS = re.compile(
    r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b(?!:[\w~/])"
)
_PHONES = re.compile(r"(?<![\w+])\+\d[\d ().-]{6,20}\d")


def _secrets(text: str) -> Iterator[re.Match[str]]:
    found: dict[int, re.Match[str]] = {}
    for literal, pattern in _SECRETS:
        if literal in text:
            for match in pattern.finditer(text):
                if not any(m.start() <= match.start() < m.end() for m in found.values()):
                    found[match.start()] = match
    return iter(sorted(found.values(), key=lambda m: m.start()))


def _alone(text: str, match: re.Match[str], glue: str) -> bool:
    """Whether ``match`` is not the middle of a longer run (of word characters, or of ``glue``)."""
    before = text[match.start() - 1] if match.start() else " "
    after = text[match.end()] if match.end() < len(text) else " "
    return not (before.isalnum() or before in glue or after.isalnum() or after in glue)


def _valid_matches(
    text: str, pattern: re.Pattern[str], valid: Callable[[re.Match[str]], bool], separators: str
) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` that ``valid`` accepts. A candidate may run on into what follows
    it (``… 0004 7 items``: the ``7`` too), so a rejected one is cut back at each separator, longest
    first; if none holds, the search goes on one character later (``order 4 5500 …``)."""
    pos = 0
    while (match := pattern.search(text, pos)) is not None:
        start = match.start()
        ends = [match.end()] + [i for i in range(match.end() - 1, start, -1) if text[i] in separators]
        found = None
        for end in ends:
            candidate = pattern.fullmatch(text, start, end)
            if candidate is not None and valid(candidate):
                found = candidate
                break
        if found is not None:
            yield found
            pos = found.end()
        else:
            pos = start + 1


def _card(text: str, match: re.Match[str]) -> bool:
    groups = re.split(r"[ -]", match.group())  # printed whole, or in groups (4-4-4-4, 4-6-5 …)
    digits = "".join(groups)
    shaped = len(groups) == 1 or min(len(group) for group in groups) >= 3
    return shaped and _alone(text, match, "-") and len(set(digits)) > 1 and luhn.is_valid(digits)


def _cards(text: str) -> Iterator[re.Match[str]]:
    return _valid_matches(text, _CARDS, lambda m: _card(text, m), " -")


def _ibans(text: str) -> Iterator[re.Match[str]]:
    return _valid_matches(text, _IBANS, lambda m: _alone(text, m, "_") and iban.is_valid(m.group()), " ")


def _emails(text: str) -> Iterator[re.Match[str]]:
    return _EMAILS.finditer(text) if "@" in text else iter(())


def _phones(text: str) -> Iterator[re.Match[str]]:
    if "+" not in text:
        return iter(())
    return _valid_matches(text, _PHONES, lambda m: _valid_phone(m.group()), " ().-")


@functools.lru_cache(maxsize=4096)
def _valid_phone(candidate: str) -> bool:
    """Whether ``candidate`` (``+…``) is a number some numbering plan could dial (parsing is slow:
    the same candidate, as in a prompt that repeats a number, is judged once)."""
    try:
        return bool(phonenumbers.is_valid_number(phonenumbers.parse(candidate, None)))
    except phonenumbers.NumberParseException:
        return False


_FIND: dict[str, Callable[[str], Iterator[re.Match[str]]]] = {
    SECRET: _secrets,
    CARD: _cards,
    IBAN: _ibans,
    EMAIL: _emails,
    PHONE: _phones,
}


def find(text: str, detectors: tuple[str, ...] = DETECTORS) -> Counter[str]:
    """How many matches each of ``detectors`` finds in ``text``."""
    return Counter({name: n for name in detectors if (n := sum(1 for _ in _FIND[name](text)))})


@dataclass
class Redactor:
    """Replaces what the ``redact`` detectors find, one request at a time: the same value gets the
    same placeholder throughout the request (``[EMAIL_1]`` twice), so the model can still follow it."""

    detectors: tuple[str, ...]
    found: Counter[str] = field(default_factory=Counter)
    _names: dict[tuple[str, str], str] = field(default_factory=dict)

    def __call__(self, text: str) -> str:
        for name in self.detectors:  # secrets first: a key may hold what looks like an e-mail
            spans = [(m.start(), m.end()) for m in _FIND[name](text)]
            if not spans:
                continue
            self.found[name] += len(spans)
            pieces, last = [], 0
            for start, end in spans:
                pieces += [text[last:start], self._placeholder(name, text[start:end])]
                last = end
            text = "".join(pieces) + text[last:]
        return text

    def _placeholder(self, name: str, value: str) -> str:
        key = (name, value)
        if key not in self._names:
            count = sum(1 for kind, _ in self._names if kind == name)
            self._names[key] = f"[{name.upper()}_{count + 1}]"
        return self._names[key]
