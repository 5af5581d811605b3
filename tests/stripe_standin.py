"""Stripe on loopback, for what is external and paid: the few API endpoints the pool calls, pages a
browser pays and onboards at, and webhooks signed the way Stripe signs them.

``python -m tests.stripe_standin --port P --webhook-url URL --webhook-secret whsec_…``

API (form-encoded in, JSON out, as Stripe's): ``POST /v1/checkout/sessions`` (``customer_creation``
and ``setup_future_usage`` save a card), ``GET /v1/payment_intents/{id}``, ``POST /v1/payment_intents``
(an off-session charge of a saved card), ``POST /v1/accounts``, ``POST /v1/account_links``, ``POST /v1/transfers``
(``Idempotency-Key`` replays the first answer; a refused transfer is Stripe's 400 error body).
Pages: ``/pay/{session}`` (a "Pay" button: the session completes, its webhook goes out, the browser
goes to the success URL) and ``/onboard/{account}``.

Test controls, under ``/_control``: ``complete`` (pay a session without a browser), ``refund``,
``dispute``, ``reverse`` (a transfer), ``fail-transfers`` (an account's transfers are refused),
``decline`` (a customer's saved card is declined), ``intents``,
``deliver`` (send stored events again, in any order, with any timestamp), ``events``, ``transfers``.
Every event is stored; ``"hold": true`` on a control stores it without sending it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import time
from typing import Any

import aiohttp
from aiohttp import web

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_test_{next(_ids):06d}{int(time.time() * 1000) % 100000:05d}"


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    """Stripe's ``Stripe-Signature``: ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body" under the secret>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response(
        {"error": {"type": "invalid_request_error", "message": message, "code": code}}, status=status
    )


class Stripe:
    def __init__(self, webhook_url: str, secret: str) -> None:
        self.webhook_url = webhook_url
        self.secret = secret
        self.sessions: dict[str, dict[str, Any]] = {}
        self.intents: dict[str, dict[str, Any]] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        self.transfers: dict[str, dict[str, Any]] = {}
        self.idempotent: dict[str, dict[str, Any]] = {}
        self.failing: set[str] = set()
        self.declining: set[str] = set()  # customers whose saved card is declined
        self.tasks: set[asyncio.Task[None]] = set()
        self.events: dict[str, dict[str, Any]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self.base = ""

    # --- the API ---------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        form = await request.post()
        replay = self._replayed(request)
        if replay is not None:
            return web.json_response(replay)
        session_id = new_id("cs")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": form.get("mode"),
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": int(str(form["line_items[0][price_data][unit_amount]"])),
            "currency": form.get("line_items[0][price_data][currency]"),
            "client_reference_id": form.get("client_reference_id"),
            "customer_email": form.get("customer_email"),
            "metadata": {k[len("metadata[") : -1]: str(v) for k, v in form.items() if k.startswith("metadata[")},
            "intent_metadata": {"pool_payment": form.get("payment_intent_data[metadata][pool_payment]")},
            "save": form.get("customer_creation") == "always"
            and form.get("payment_intent_data[setup_future_usage]") == "off_session",
            "customer": None,
            "payment_intent": None,
            "success_url": form.get("success_url"),
            "cancel_url": form.get("cancel_url"),
            "url": f"{self.base}/pay/{session_id}",
        }
        self.sessions[session_id] = session
        return web.json_response(self._remember(request, self._public(session)))

    async def get_intent(self, request: web.Request) -> web.Response:
        intent = self.intents.get(request.match_info["id"])
        if intent is None:
            return _error(404, "No such payment_intent", "resource_missing")
        return web.json_response(intent)

    async def create_account(self, request: web.Request) -> web.Response:
        await request.post()
        replay = self._replayed(request)
        if replay is not None:
            return web.json_response(replay)
        account = {"id": new_id("acct"), "object": "account", "payouts_enabled": False}
        self.accounts[account["id"]] = account
        return web.json_response(self._remember(request, account))

    async def create_link(self, request: web.Request) -> web.Response:
        form = await request.post()
        account = str(form.get("account"))
        if account not in self.accounts:
            return _error(400, "No such account", "resource_missing")
        self.accounts[account]["return_url"] = form.get("return_url")
        return web.json_response({"object": "account_link", "url": f"{self.base}/onboard/{account}"})

    async def create_transfer(self, request: web.Request) -> web.Response:
        form = await request.post()
        replay = self._replayed(request)
        if replay is not None:
            return web.json_response(replay)
        destination = str(form.get("destination"))
        account = self.accounts.get(destination)
        if account is None or not account["payouts_enabled"] or destination in self.failing:
            return _error(400, "The destination account cannot receive transfers.", "account_invalid")
        transfer = {
            "id": new_id("tr"),
            "object": "transfer",
            "amount": int(str(form["amount"])),
            "currency": form.get("currency"),
            "destination": destination,
            "metadata": {"pool_payout": form.get("metadata[pool_payout]")},
            "reversed": False,
        }
        self.transfers[transfer["id"]] = transfer
        return web.json_response(self._remember(request, transfer))

    def _replayed(self, request: web.Request) -> dict[str, Any] | None:
        key = request.headers.get("Idempotency-Key")
        return self.idempotent.get(key) if key else None

    def _remember(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        key = request.headers.get("Idempotency-Key")
        if key:
            self.idempotent[key] = body
        return body

    @staticmethod
    def _public(session: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in session.items() if k not in ("intent_metadata", "save")}

    async def create_intent(self, request: web.Request) -> web.Response:
        """An off-session charge of a saved card (automatic top-ups): succeeded at once, its webhook
        sent just after the answer, as Stripe does; a card in ``declining`` gets Stripe's 402."""
        form = await request.post()
        replay = self._replayed(request)
        if replay is not None:
            return web.json_response(replay)
        customer = str(form.get("customer"))
        metadata = {k[len("metadata[") : -1]: str(v) for k, v in form.items() if k.startswith("metadata[")}
        intent = {
            "id": new_id("pi"),
            "object": "payment_intent",
            "amount": int(str(form["amount"])),
            "amount_received": int(str(form["amount"])),
            "currency": form.get("currency"),
            "customer": customer,
            "payment_method": form.get("payment_method"),
            "metadata": metadata,
            "charge": new_id("ch"),
            "status": "succeeded",
        }
        self.intents[intent["id"]] = intent
        if customer in self.declining:
            intent.update(status="requires_payment_method", amount_received=0)
            intent["last_payment_error"] = {"message": "Your card was declined.", "code": "card_declined"}
            self.later("payment_intent.payment_failed", intent)
            body = {"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}}
            self._remember(request, body)
            return web.json_response(body, status=402)
        self.later("payment_intent.succeeded", intent)
        return web.json_response(self._remember(request, intent))

    def later(self, kind: str, obj: dict[str, Any]) -> None:
        """An event sent after the current answer (Stripe's webhooks come on their own)."""

        async def send() -> None:
            await asyncio.sleep(0.05)
            await self.event(kind, obj)

        task = asyncio.get_running_loop().create_task(send())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- pages -----------------------------------------------------------------------------

    async def pay_page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="no such session")
        dollars = session["amount_total"] / 100
        html = (
            f"<!doctype html><title>Pay</title><h1>Stand-in checkout</h1><p>Pay ${dollars:.2f}</p>"
            f'<form method="post"><button type="submit" id="pay">Pay ${dollars:.2f}</button></form>'
        )
        return web.Response(text=html, content_type="text/html")

    async def pay(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="no such session")
        await self._complete(session, hold=False)
        raise web.HTTPSeeOther(str(session["success_url"]))

    async def onboard(self, request: web.Request) -> web.Response:
        account = self.accounts.get(request.match_info["id"])
        if account is None:
            return web.Response(status=404, text="no such account")
        account["payouts_enabled"] = True
        raise web.HTTPSeeOther(str(account.get("return_url") or "/"))

    async def _complete(self, session: dict[str, Any], hold: bool) -> dict[str, Any]:
        if session["payment_intent"] is None:
            if session["save"]:
                session["customer"] = new_id("cus")
            intent = {
                "id": new_id("pi"),
                "object": "payment_intent",
                "amount": session["amount_total"],
                "amount_received": session["amount_total"],
                "currency": session["currency"],
                "metadata": session["intent_metadata"],
                "charge": new_id("ch"),
                "customer": session["customer"],
                "payment_method": new_id("pm") if session["save"] else None,
                "status": "succeeded",
            }
            self.intents[intent["id"]] = intent
            session.update(payment_intent=intent["id"], payment_status="paid", status="complete")
        return await self.event("checkout.session.completed", self._public(session), hold)

    # --- events ----------------------------------------------------------------------------

    async def event(self, kind: str, obj: dict[str, Any], hold: bool = False) -> dict[str, Any]:
        event = {
            "id": new_id("evt"),
            "object": "event",
            "type": kind,
            "created": int(time.time()),
            "livemode": False,
            "data": {"object": dict(obj)},
        }
        self.events[event["id"]] = event
        if not hold:
            await self.deliver(event["id"])
        return event

    async def deliver(self, event_id: str, age: int = 0, secret: str | None = None) -> int:
        payload = web.json_response(self.events[event_id]).body
        assert isinstance(payload, bytes)
        header = signature(payload, secret or self.secret, int(time.time()) - age)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.webhook_url, data=payload, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
            ) as response,
        ):
            text = await response.text()
            self.deliveries.append({"event": event_id, "status": response.status, "body": text})
            return response.status

    # --- controls --------------------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        what = request.match_info["what"]
        body: dict[str, Any] = await request.json() if request.can_read_body else {}
        hold = bool(body.get("hold"))
        if what == "complete":
            return web.json_response(await self._complete(self.sessions[body["session"]], hold))
        if what == "expire":
            session = self.sessions[body["session"]]
            session["status"] = "expired"
            return web.json_response(await self.event("checkout.session.expired", self._public(session), hold))
        if what == "refund":  # amount_refunded is cumulative, as on a Stripe charge
            intent = self.intents[body["payment_intent"]]
            intent["refunded"] = intent.get("refunded", 0) + int(body["amount"])
            charge = {
                "id": intent["charge"],
                "object": "charge",
                "amount": intent["amount"],
                "amount_refunded": intent["refunded"],
                "currency": intent["currency"],
                "payment_intent": intent["id"],
                "metadata": intent["metadata"],
            }
            return web.json_response(await self.event("charge.refunded", charge, hold))
        if what == "dispute":
            intent = self.intents[body["payment_intent"]]
            dispute = {
                "id": body.get("id") or new_id("dp"),
                "object": "dispute",
                "amount": int(body.get("amount", intent["amount"])),
                "currency": intent["currency"],
                "charge": intent["charge"],
                "payment_intent": intent["id"],
                "status": body.get("status", "needs_response"),
            }
            kind = "charge.dispute.closed" if body.get("closed") else "charge.dispute.created"
            return web.json_response(await self.event(kind, dispute, hold))
        if what == "reverse":
            transfer = self.transfers[body["transfer"]]
            transfer["reversed"] = True
            transfer["amount_reversed"] = int(body.get("amount", transfer["amount"]))
            return web.json_response(await self.event("transfer.reversed", transfer, hold))
        if what == "decline":
            self.declining.add(body["customer"])
            return web.json_response({"declining": sorted(self.declining)})
        if what == "intents":
            return web.json_response({"intents": list(self.intents.values())})
        if what == "fail-transfers":
            self.failing.add(body["account"])
            return web.json_response({"failing": sorted(self.failing)})
        if what == "onboard":
            self.accounts[body["account"]]["payouts_enabled"] = True
            return web.json_response(self.accounts[body["account"]])
        if what == "deliver":
            statuses = [
                await self.deliver(event_id, int(body.get("age", 0)), body.get("secret")) for event_id in body["events"]
            ]
            return web.json_response({"statuses": statuses})
        if what == "events":
            return web.json_response({"events": list(self.events.values()), "deliveries": self.deliveries})
        if what == "transfers":
            return web.json_response({"transfers": list(self.transfers.values()), "accounts": self.accounts})
        if what == "sessions":
            return web.json_response({"sessions": [self._public(s) for s in self.sessions.values()]})
        return web.json_response({"error": "unknown control"}, status=404)


def app(stripe: Stripe) -> web.Application:
    application = web.Application()
    application.add_routes(
        [
            web.post("/v1/checkout/sessions", stripe.create_session),
            web.get("/v1/payment_intents/{id}", stripe.get_intent),
            web.post("/v1/payment_intents", stripe.create_intent),
            web.post("/v1/accounts", stripe.create_account),
            web.post("/v1/account_links", stripe.create_link),
            web.post("/v1/transfers", stripe.create_transfer),
            web.get("/pay/{id}", stripe.pay_page),
            web.post("/pay/{id}", stripe.pay),
            web.get("/onboard/{id}", stripe.onboard),
            web.get("/_control/{what}", stripe.control),
            web.post("/_control/{what}", stripe.control),
        ]
    )
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--webhook-url", required=True)
    parser.add_argument("--webhook-secret", required=True)
    args = parser.parse_args()
    stripe = Stripe(args.webhook_url, args.webhook_secret)
    stripe.base = f"http://127.0.0.1:{args.port}"
    web.run_app(app(stripe), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
