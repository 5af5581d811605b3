"""The payment provider (Stripe): Checkout sessions for top-ups, the webhook that credits them, Connect
accounts and transfers for payouts. What the money does is ``money/payments.py`` and
``money/payouts.py``; this module speaks to Stripe and turns its events into facts.

Stripe is reached through the ``stripe`` library (``POOL_STRIPE_API_BASE`` points it elsewhere, as
tests do at a stand-in on loopback). A webhook is believed only when the library's signature check
passes with the endpoint's secret and a timestamp under five minutes old; its body is then read as
plain JSON. Events the pool does not act on are acknowledged and recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import stripe
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import User
from coordinator.core.ratelimit import AddressLimits
from coordinator.core.settings import Settings
from coordinator.money import ledger, payments, payouts
from coordinator.money.payments import DISPUTE_CLOSED, DISPUTE_OPEN, Facts
from shared.money import nano_to_usd, usd_to_nano

log = logging.getLogger(__name__)

NANO_PER_CENT = 10_000_000
CHECKOUTS_PER_HOUR = 30  # per user
WEBHOOK_TOLERANCE = 300  # seconds: an older signature is a replay


class PaymentsUnavailable(Exception):
    """Stripe is not configured (``POOL_STRIPE_SECRET_KEY``), or it refused or could not be reached."""


class BadSignature(Exception):
    """A webhook whose signature or timestamp does not check out."""


class TooManyCheckouts(Exception):
    """More Checkout sessions than a user needs (each is a call to the payment provider and a row)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry in {retry_after} s")
        self.retry_after = retry_after


class BadAmount(ValueError):
    """An amount of USD that is not whole cents within the bounds; its message says which."""


def whole_cents(value: str | float | int, low: int, high: int) -> int:
    """A USD amount as nano-USD, if it is whole cents between ``low`` and ``high`` (nano-USD)."""
    try:
        amount = usd_to_nano(value, ledger.MAX_GRANT_USD)
    except ValueError as exc:
        raise BadAmount(str(exc)) from None
    if amount % NANO_PER_CENT:
        raise BadAmount("must be whole cents")
    if not low <= amount <= high:
        raise BadAmount(f"must be between {nano_to_usd(low):.2f} and {nano_to_usd(high):.2f} USD")
    return amount


class Event(msgspec.Struct):
    id: str
    type: str
    data: dict[str, Any]


@dataclass
class Payments:
    settings: Settings
    engine: AsyncEngine
    client: stripe.StripeClient | None = None
    _http: stripe.AIOHTTPClient | None = None
    checkouts: AddressLimits = field(default_factory=lambda: AddressLimits(CHECKOUTS_PER_HOUR, 3600.0))

    @classmethod
    def of(cls, settings: Settings, engine: AsyncEngine) -> Payments:
        if not settings.stripe_secret_key:
            return cls(settings, engine)
        http = stripe.AIOHTTPClient(timeout=30)
        bases: Any = (
            {"api": settings.stripe_api_base, "connect": settings.stripe_api_base} if settings.stripe_api_base else None
        )
        client = stripe.StripeClient(
            settings.stripe_secret_key, base_addresses=bases, http_client=http, max_network_retries=2
        )
        return cls(settings, engine, client, http)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def page_origins(self) -> str:
        """Where the portal's money forms lead (Checkout, Connect onboarding): Stripe's pages, or
        the origin of ``POOL_STRIPE_API_BASE`` when Stripe is reached elsewhere."""
        if not self.enabled:
            return ""
        base = self.settings.stripe_api_base
        if base:
            parts = urlsplit(base)
            return f"{parts.scheme}://{parts.netloc}"
        return "https://checkout.stripe.com https://connect.stripe.com"

    def _stripe(self) -> stripe.StripeClient:
        if self.client is None:
            raise PaymentsUnavailable("Payments are not configured on this pool.")
        return self.client

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()  # type: ignore[no-untyped-call]

    def _url(self, path: str) -> str:
        return f"{self.settings.public_url or ''}{path}"

    async def _email(self, user_id: int) -> str:
        async with self.engine.connect() as conn:
            return str(await conn.scalar(select(User.email).where(User.id == user_id)))

    # --- top-ups ---------------------------------------------------------------------------------

    async def checkout(
        self, user_id: int, amount_usd: str | float | int, back: str, save: bool = False
    ) -> tuple[str, str]:
        """Open a Checkout session for a top-up of ``amount_usd`` (:class:`BadAmount` unless whole
        cents within the pool's bounds); (payment id, the URL to send the user to). ``back`` is the
        pool's page the user returns to; ``save``: keep the card for automatic top-ups."""
        amount = whole_cents(amount_usd, self.settings.topup_min, self.settings.topup_max)
        email = await self._email(user_id)
        self._stripe()
        wait = self.checkouts.take(f"user:{user_id}")
        if wait:
            raise TooManyCheckouts(wait)
        payment_id = payments.new_id()
        await payments.open_payment(self.engine, payment_id, user_id, amount, "checkout")
        params: Any = {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": amount // NANO_PER_CENT,
                        "product_data": {"name": "Provider Pool credits"},
                    },
                }
            ],
            "client_reference_id": payment_id,
            "customer_email": email,
            "metadata": {"pool_payment": payment_id},
            "payment_intent_data": {"metadata": {"pool_payment": payment_id}},
            "success_url": self._url(f"{back}?topup=paid"),
            "cancel_url": self._url(f"{back}?topup=cancelled"),
        }
        if save:
            params["customer_creation"] = "always"
            params["payment_intent_data"]["setup_future_usage"] = "off_session"
            params["metadata"]["pool_save"] = "1"
        try:
            session = await self._stripe().v1.checkout.sessions.create_async(params, {"idempotency_key": payment_id})
        except stripe.StripeError as exc:
            log.warning("checkout session failed", extra={"payment": payment_id, "error": type(exc).__name__})
            raise PaymentsUnavailable("The payment provider could not start a checkout; try again shortly.") from None
        await payments.attach_session(self.engine, payment_id, session.id)
        return payment_id, str(session.url)

    # --- the webhook -----------------------------------------------------------------------------

    def verify(self, payload: bytes, signature: str | None) -> Event:
        """The event in ``payload``, if Stripe signed it with this endpoint's secret within the
        tolerance; :class:`BadSignature` otherwise."""
        secret = self.settings.stripe_webhook_secret
        if not secret:
            raise PaymentsUnavailable("Payments are not configured on this pool.")
        try:
            stripe.WebhookSignature.verify_header(payload, signature, secret, WEBHOOK_TOLERANCE)
            return msgspec.json.decode(payload, type=Event)
        except (stripe.SignatureVerificationError, msgspec.DecodeError, ValueError, IndexError):
            raise BadSignature("The webhook's signature does not verify.") from None

    async def handle(self, event: Event) -> str:
        """Apply a verified event once; what it did, for the log."""
        obj = event.data.get("object") or {}
        kind = event.type
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            if obj.get("payment_status") != "paid":
                return await self._ignore(event, "not paid yet")
            payment_id = await payments.find(self.engine, session_id=obj.get("id")) or _ours(obj)
            facts = Facts(paid=_cents(obj.get("amount_total")), payment_intent=obj.get("payment_intent"))
            if (obj.get("metadata") or {}).get("pool_save") == "1" and not await payments.seen(self.engine, event.id):
                await self._save_card(payment_id, obj)  # first: if it fails, Stripe's retry finds nothing applied
            return await self._apply(event, payment_id, facts, obj.get("currency"))
        if kind == "payment_intent.succeeded":  # automatic top-ups (a Checkout's says what its session said)
            facts = Facts(paid=_cents(obj.get("amount_received")), payment_intent=obj.get("id"))
            return await self._apply(event, _ours(obj), facts, obj.get("currency"))
        if kind == "payment_intent.payment_failed":
            payment_id = _ours(obj)
            outcome = await self._apply(event, payment_id, Facts(status=payments.FAILED), obj.get("currency"))
            user_id = (obj.get("metadata") or {}).get("pool_auto_user")
            if isinstance(user_id, str) and user_id.isdigit() and outcome.startswith("applied"):
                error = (obj.get("last_payment_error") or {}).get("message") or "the card was declined"
                await payments.auto_failed(self.engine, int(user_id), str(error))
            return outcome
        if kind in ("checkout.session.expired", "checkout.session.async_payment_failed"):
            payment_id = await payments.find(self.engine, session_id=obj.get("id")) or _ours(obj)
            status = payments.EXPIRED if kind.endswith("expired") else payments.FAILED
            return await self._apply(event, payment_id, Facts(status=status), "usd")
        if kind == "charge.refunded":
            payment_id = _ours(obj) or await self._by_intent(obj.get("payment_intent"))
            facts = Facts(refunded=_cents(obj.get("amount_refunded")), payment_intent=obj.get("payment_intent"))
            return await self._apply(event, payment_id, facts, obj.get("currency"))
        if kind in ("charge.dispute.created", "charge.dispute.closed"):
            if str(obj.get("status", "")).startswith("warning_"):  # an inquiry: no money moves
                return await self._ignore(event, "an inquiry, not a dispute")
            payment_id = await self._by_intent(obj.get("payment_intent"))
            if kind.endswith("created"):
                facts = Facts(dispute_stage=DISPUTE_OPEN, disputed=_cents(obj.get("amount")))
            else:  # won: the money came back; lost (or anything else): it stays with the cardholder
                won = obj.get("status") == "won"
                facts = Facts(dispute_stage=DISPUTE_CLOSED, disputed=0 if won else _cents(obj.get("amount")))
            return await self._apply(event, payment_id, facts, obj.get("currency"))
        if kind == "transfer.reversed":
            return await self._transfer_reversed(event, obj)
        return await self._ignore(event, "not an event the pool acts on")

    async def _apply(self, event: Event, payment_id: str | None, facts: Facts, currency: object) -> str:
        if payment_id is None:
            return await self._ignore(event, "not a payment of this pool")
        if currency != "usd":
            log.warning("payment event in another currency", extra={"event": event.id, "payment": payment_id})
            return await self._ignore(event, "not in USD")
        applied = await payments.apply(self.engine, event.id, event.type, payment_id, facts)
        if applied is None:
            return "already applied"
        log.info(
            "payment event applied",
            extra={"event": event.id, "payment": payment_id, "change_nano": applied.change, "user": applied.user_id},
        )
        return f"applied: {applied.change:+d} nano-USD"

    async def _save_card(self, payment_id: str | None, session: dict[str, Any]) -> None:
        """Keep the card a Checkout saved (its customer and the payment intent's method)."""
        customer, intent = session.get("customer"), session.get("payment_intent")
        owner = await payments.owner_of(self.engine, payment_id) if payment_id else None
        if not (isinstance(customer, str) and isinstance(intent, str) and owner is not None):
            return
        try:
            method = (await self._stripe().v1.payment_intents.retrieve_async(intent)).to_dict().get("payment_method")
        except stripe.StripeError:
            raise PaymentsUnavailable("The payment provider could not be asked about this payment.") from None
        if isinstance(method, str):
            await payments.save_method(self.engine, owner, customer, method)
            log.info("card saved for automatic top-ups", extra={"user": owner})

    async def top_up_automatically(self, auto: payments.Auto) -> str:
        """Charge an automatic top-up whose balance crossed its threshold, if this process wins the
        crossing (``payments.disarm``); what happened. The charge's idempotency key is the user and
        the crossing, so a retry after an error cannot charge twice."""
        if not await payments.disarm(self.engine, auto.user_id, auto.fired):
            return "another process fired it"
        return await self._charge(auto, auto.fired)

    async def retry_top_up(self, auto: payments.Auto) -> str:
        """Make again the charge of a crossing that was taken but never came back (same payment,
        same idempotency key: Stripe answers with the first charge if there was one)."""
        return await self._charge(auto, auto.fired - 1)

    async def _charge(self, auto: payments.Auto, crossing: int) -> str:
        payment_id = payments.crossing_id(auto.user_id, crossing)
        await payments.open_payment(self.engine, payment_id, auto.user_id, auto.amount, "auto")
        params: Any = {
            "amount": auto.amount // NANO_PER_CENT,
            "currency": "usd",
            "customer": auto.customer_id,
            "payment_method": auto.payment_method,
            "off_session": True,
            "confirm": True,
            "metadata": {"pool_payment": payment_id, "pool_auto_user": str(auto.user_id)},
        }
        try:
            await self._stripe().v1.payment_intents.create_async(
                params, {"idempotency_key": f"pool-auto-{auto.user_id}-{crossing}"}
            )
        except stripe.CardError as exc:
            await payments.auto_failed(self.engine, auto.user_id, exc.user_message or "the card was declined")
            log.warning("automatic top-up declined", extra={"user": auto.user_id, "code": exc.code})
            return "declined"
        except stripe.StripeError:  # unknown whether it was made: the stalled sweep asks again, same key
            log.warning("automatic top-up not confirmed; retried", extra={"user": auto.user_id})
            return "retried later"
        log.info("automatic top-up charged", extra={"user": auto.user_id, "payment": payment_id})
        return "charged"

    async def _ignore(self, event: Event, why: str) -> str:
        await payments.record_event(self.engine, event.id, event.type)
        return f"ignored: {why}"

    async def _by_intent(self, intent: object) -> str | None:
        """The payment behind a payment intent: known once its session completed; before (events
        out of order), its metadata at Stripe names it."""
        if not isinstance(intent, str) or not intent:
            return None
        found = await payments.find(self.engine, payment_intent=intent)
        if found is not None:
            return found
        try:
            remote = await self._stripe().v1.payment_intents.retrieve_async(intent)
        except stripe.StripeError:
            raise PaymentsUnavailable("The payment provider could not be asked about this payment.") from None
        return _ours(remote.to_dict())

    async def _transfer_reversed(self, event: Event, obj: dict[str, Any]) -> str:
        """A transfer taken back: the payout's amount returns to the provider's earnings, in the
        same transaction as the event is recorded. A partial reversal is the operator's to settle."""
        payout_id = (obj.get("metadata") or {}).get("pool_payout")
        if not isinstance(payout_id, str):
            return await self._ignore(event, "not a payout of this pool")
        found = await payouts.get(self.engine, payout_id)
        reversed_cents = obj.get("amount_reversed")
        if found is not None and isinstance(reversed_cents, int) and reversed_cents * NANO_PER_CENT < found.amount:
            log.warning("partial transfer reversal: settle it by hand", extra={"payout": payout_id, "event": event.id})
            return await self._ignore(event, "a partial reversal")
        try:
            await payouts.failed(
                self.engine, payout_id, "the transfer was reversed", was=payouts.PAID, event=(event.id, event.type)
            )
        except payouts.PayoutRefused as exc:
            if exc.code == "already_applied":
                return "already applied"
            return await self._ignore(event, exc.message)
        return "payout returned to earnings"

    # --- payouts ---------------------------------------------------------------------------------

    async def onboarding_link(self, user_id: int, back: str) -> str:
        """A Connect onboarding link for the user's payout account (opened on first use)."""
        client = self._stripe()
        email = await self._email(user_id)
        try:
            account_id = await payouts.account_of(self.engine, user_id)
            if account_id is None:
                account = await client.v1.accounts.create_async(
                    {"type": "express", "email": email, "metadata": {"pool_user": str(user_id)}},
                    {"idempotency_key": f"pool-account-{user_id}"},
                )
                account_id = await payouts.connect_account(self.engine, user_id, account.id)
            link = await client.v1.account_links.create_async(
                {
                    "account": account_id,
                    "type": "account_onboarding",
                    "refresh_url": self._url(back),
                    "return_url": self._url(f"{back}?payouts=connected"),
                }
            )
        except stripe.StripeError as exc:
            log.warning("payout account link failed", extra={"user": user_id, "error": type(exc).__name__})
            raise PaymentsUnavailable("The payment provider could not open onboarding; try again shortly.") from None
        return str(link.url)

    async def request_payout(self, user_id: int, amount_usd: str | float | int) -> payouts.Payout:
        """Ask for a payout of ``amount_usd`` of matured earnings (:class:`BadAmount` unless whole
        cents; :class:`payouts.PayoutRefused` under the minimum, over the earnings, or without a
        payout account)."""
        amount = whole_cents(amount_usd, 1, ledger.MAX_GRANT_USD * 10**9)
        found = await payouts.request(self.engine, payouts.new_id(), user_id, amount, self.settings.payout_minimum)
        log.info("payout requested", extra={"payout": found.id, "user": user_id, "amount_nano": amount})
        return found

    async def approve(self, payout_id: str, operator: str) -> payouts.Payout:
        """An operator approves a payout: its transfer is made at once (a refused one returns the
        amount; an unreachable Stripe leaves it approved for the retry sweep)."""
        await payouts.approve(self.engine, payout_id, operator)
        log.info("payout approved", extra={"payout": payout_id, "operator": operator})
        return await self.transfer(payout_id)

    async def reject(self, payout_id: str, operator: str, reason: str) -> payouts.Payout:
        found = await payouts.reject(self.engine, payout_id, operator, reason)
        log.info("payout rejected", extra={"payout": payout_id, "operator": operator})
        return found

    async def transfer(self, payout_id: str) -> payouts.Payout:
        """Make an approved payout's transfer (idempotent on the payout at Stripe, so a retry after
        a crash cannot pay twice); a refused transfer returns the amount to the earnings."""
        payout = await payouts.get(self.engine, payout_id)
        if payout is None or payout.status != payouts.APPROVED:
            raise payouts.PayoutRefused("payout_state", "Only an approved payout is transferred.")
        params: Any = {
            "amount": payout.amount // NANO_PER_CENT,
            "currency": "usd",
            "destination": payout.destination,
            "metadata": {"pool_payout": payout.id},
        }
        try:
            transfer = await self._stripe().v1.transfers.create_async(params, {"idempotency_key": payout.id})
        except stripe.InvalidRequestError as exc:  # the transfer itself was refused
            reason = exc.user_message or "the payment provider refused the transfer"
            log.warning("payout transfer refused", extra={"payout": payout.id, "code": exc.code})
            return await payouts.failed(self.engine, payout.id, reason)
        except stripe.StripeError:  # unreachable: stays approved, the sweep tries again
            log.warning("payout transfer not made", extra={"payout": payout.id})
            raise PaymentsUnavailable(
                "The payment provider could not be reached; the transfer will be retried."
            ) from None
        return await payouts.transferred(self.engine, payout.id, transfer.id)


def _ours(obj: dict[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("pool_payment")
    return value if isinstance(value, str) and value.startswith("pay_") else None


def _cents(value: object) -> int:
    return value * NANO_PER_CENT if isinstance(value, int) and value > 0 else 0
