"""A consumer key's policy: what the key may do, set by its owner and checked on every request
before anything is held or dispatched (``services/inference.admit``).

- ``paused``: refused with 403 ``api_disabled`` until resumed (revoking stays final);
- ``models``: the slugs or families the key may ask for (none: any);
- ``maxPrice``: the most the key pays per 1M prompt and completion tokens (USD); dearer agents
  and the upstream are left out, as with a request's own ``provider.max_price``;
- ``privacy``: who may see the key's prompts: ``any`` agent above the pool's trust threshold,
  only ``trusted`` ones (at or above ``POOL_TRUSTED_TIER_TRUST``) or the ``platform`` upstream alone;
- ``project``: a label the request log keeps with each request;
- ``dlp``: data protection, per detector (``secret``, ``card``, ``iban``, ``email``, ``phone``:
  ``core/dlp.py``) an action: ``block`` (403 ``policy_blocked``), ``redact`` (placeholders before
  dispatch) or ``private`` (served only by trusted agents or the platform upstream);
- ``spendCap``: the most the key spends per UTC day and per UTC month (USD), over every coordinator
  (``money/budgets.py``); a request whose worst case no longer fits is refused with 403
  ``policy_blocked``.

Stored as JSON on the key (``api_keys.policy``); an absent policy allows everything.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from coordinator.core.dlp import DETECTORS
from shared.money import usd_to_nano

ANY, TRUSTED, PLATFORM = "any", "trusted", "platform"
Privacy = Literal["any", "trusted", "platform"]
Action = Literal["block", "redact", "private"]
MAX_MODELS = 100
MAX_NAME = 100
MAX_CAP_USD = 1_000_000


class PolicyError(ValueError):
    """A policy that cannot be kept: the message names the field."""


class MaxPrice(msgspec.Struct, forbid_unknown_fields=True):
    prompt: float | None = None  # USD per 1M tokens
    completion: float | None = None


class SpendCap(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    day: float | None = None  # USD per UTC day
    month: float | None = None  # USD per UTC month


class KeyPolicy(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, rename="camel"):
    paused: bool = False
    models: list[str] | None = None
    max_price: MaxPrice | None = None
    privacy: Privacy = "any"
    project: str = ""
    spend_cap: SpendCap | None = None
    dlp: dict[str, Action] | None = None

    def check(self) -> KeyPolicy:
        """The policy itself if every field holds; :class:`PolicyError` naming the first that does not."""
        if self.models is not None:
            if not self.models:
                raise PolicyError("models: at least one slug or family (leave it out to allow any)")
            if len(self.models) > MAX_MODELS:
                raise PolicyError(f"models: at most {MAX_MODELS} entries")
            if any(not name.strip() or len(name) > MAX_NAME for name in self.models):
                raise PolicyError(f"models: each a slug or family of 1 to {MAX_NAME} characters")
        if self.max_price is not None:
            for side in ("prompt", "completion"):
                value = getattr(self.max_price, side)
                if value is not None and not 0 <= value < 1e9:
                    raise PolicyError(f"maxPrice.{side}: USD per 1M tokens, 0 or more")
        if self.spend_cap is not None:
            for period in ("day", "month"):
                value = getattr(self.spend_cap, period)
                try:
                    if value is not None:
                        usd_to_nano(str(value), MAX_CAP_USD)
                except ValueError as exc:
                    raise PolicyError(
                        f"spendCap.{period}: USD, more than 0 and at most {MAX_CAP_USD:,} ({exc})"
                    ) from None
        for detector in self.dlp or {}:
            if detector not in DETECTORS:
                raise PolicyError(f"dlp: no detector {detector[:40]!r} (there are {', '.join(DETECTORS)})")
        if len(self.project) > MAX_NAME:
            raise PolicyError(f"project: at most {MAX_NAME} characters")
        return self

    def caps(self) -> dict[str, int]:
        """The spend caps in nano-USD by period kind (``day``, ``month``); empty: none."""
        if self.spend_cap is None:
            return {}
        caps = {"day": self.spend_cap.day, "month": self.spend_cap.month}
        return {kind: usd_to_nano(str(usd), MAX_CAP_USD) for kind, usd in caps.items() if usd is not None}

    def allows(self, slug: str, family: str | None) -> bool:
        """Whether the key may ask for ``slug`` (whose directory family is ``family``)."""
        return self.models is None or slug in self.models or (family is not None and family in self.models)


_decoder = msgspec.json.Decoder(KeyPolicy)


def encode(policy: KeyPolicy | None) -> str | None:
    """The stored form; ``None`` for a policy that allows everything."""
    if policy is None or policy == KeyPolicy():
        return None
    return msgspec.json.encode(policy).decode()


def decode(stored: str | None) -> KeyPolicy | None:
    return None if not stored else _decoder.decode(stored)
