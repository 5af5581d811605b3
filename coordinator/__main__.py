"""``pool-coordinator``: serve, migrate, admin."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Awaitable, Callable

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.core import db
from coordinator.core.settings import Settings, SettingsError
from coordinator.identity import users
from coordinator.identity.policies import KeyPolicy, PolicyError
from coordinator.market import catalog
from coordinator.money import ledger
from coordinator.trust import references
from shared import logs
from shared.money import usd_per_million_to_nano_per_token, usd_to_nano


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pool-coordinator", description="Provider Pool coordinator")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="apply migrations, then serve the API and the agent websocket")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    commands.add_parser("migrate", help="apply database migrations")
    admin = commands.add_parser("admin", help="manage users, keys and agent tokens")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    user = admin_commands.add_parser("create-user", help="create a user")
    user.add_argument("--email", required=True)
    approve = admin_commands.add_parser("approve-user", help="let a user who signed up (POOL_SIGNUP_APPROVAL) log in")
    approve.add_argument("--email", required=True)
    admin_commands.add_parser("pending-users", help="list the users waiting for approval (email and signup time)")
    role = admin_commands.add_parser("set-role", help="give a user the admin role (the operator console), or take it")
    role.add_argument("--email", required=True)
    role.add_argument("--role", choices=["admin", "none"], required=True)
    for name, what in (
        ("create-key", "a consumer key (pool_live_…)"),
        ("create-agent-token", "an agent token"),
    ):
        sub = admin_commands.add_parser(name, help=f"create {what}; prints only the secret")
        sub.add_argument("--email", required=True)
        sub.add_argument("--name", default="")
    grant = admin_commands.add_parser("grant-credits", help="add credits to a user's wallet; prints the transaction")
    grant.add_argument("--email", required=True)
    grant.add_argument("--usd", required=True, help="amount in USD, e.g. 10 or 0.25")
    grant.add_argument("--idempotency-key", help="grant at most once for this key")
    limits = admin_commands.add_parser("set-key-limits", help="override a consumer key's rate limits")
    limits.add_argument("--key-id", type=int, required=True)
    limits.add_argument("--rpm", type=int, help="requests per minute (omit: the default)")
    limits.add_argument("--tpm", type=int, help="tokens per minute (omit: the default)")
    policy = admin_commands.add_parser(
        "set-key-policy", help="replace a consumer key's policy (JSON, as PUT /v1/tokens/{id}/policy takes)"
    )
    policy.add_argument("--key-id", type=int, required=True)
    policy.add_argument("--policy", required=True, help='e.g. \'{"models": ["smollm2"], "privacy": "trusted"}\'')
    for name, what in (
        ("vouch", "vouch for a provider: its agents' canary answers become reference answers"),
        ("unvouch", "stop vouching for a provider and remove its reference answers"),
    ):
        admin_commands.add_parser(name, help=what).add_argument("--email", required=True)
    models = admin_commands.add_parser("models", help="edit the model directory (every process reloads it)")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list", help="print the directory as TOML-like lines")
    add = model_commands.add_parser("add", help="add a model, or replace its entry")
    add.add_argument("--slug", required=True)
    add.add_argument("--display-name", required=True)
    add.add_argument("--family", required=True)
    add.add_argument("--parameter-count", type=int)
    add.add_argument("--context-window", type=int)
    add.add_argument("--use-case", action="append", default=[])
    add.add_argument("--dimensions", type=int, help="an embedding model's vector size (use case: embedding)")
    add.add_argument("--matryoshka", action="store_true", help="its vectors may be cut short (`dimensions`)")
    add.add_argument("--quantization", action="append", default=[])
    add.add_argument("--alias", action="append", default=[])
    add.add_argument("--max-price-in", type=usd_per_million_to_nano_per_token, help="USD per 1M tokens")
    add.add_argument("--max-price-out", type=usd_per_million_to_nano_per_token, help="USD per 1M tokens")
    alias = model_commands.add_parser("alias", help="add aliases (backend model names) to a model")
    alias.add_argument("--slug", required=True)
    alias.add_argument("--alias", action="append", required=True)
    remove = model_commands.add_parser("remove", help="take a model out of the directory")
    remove.add_argument("--slug", required=True)
    return parser


async def _with_session(settings: Settings, action: Callable[[AsyncSession], Awaitable[str]]) -> str:
    engine = db.create_engine(settings.database_url)
    try:
        await db.migrate(engine)
        async with db.sessionmaker(engine)() as session, session.begin():
            return await action(session)
    finally:
        await engine.dispose()


async def _migrate(settings: Settings) -> None:
    engine = db.create_engine(settings.database_url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


def _admin(args: argparse.Namespace, settings: Settings) -> str:
    async def create_user(session: AsyncSession) -> str:
        user = await users.create_user(session, args.email)
        return str(user.id)

    async def approve_user(session: AsyncSession) -> str:
        user = await users.approve_user(session, args.email)
        return f"approved {user.email}"

    async def set_role(session: AsyncSession) -> str:
        user = await users.user_by_email(session, args.email)
        user.role = None if args.role == "none" else args.role
        await session.flush()
        return f"{user.email}: {args.role}"

    async def pending_users(session: AsyncSession) -> str:
        return "\n".join(f"{user.email} {user.created_at.isoformat()}" for user in await users.pending_users(session))

    async def create_key(session: AsyncSession) -> str:
        return await users.create_api_key(session, args.email, args.name)

    async def create_token(session: AsyncSession) -> str:
        return await users.create_agent_token(session, args.email, args.name)

    async def grant_credits(session: AsyncSession) -> str:
        try:
            amount = usd_to_nano(args.usd, ledger.MAX_GRANT_USD)
        except ValueError as exc:
            raise users.AccountError(f"--usd {exc}") from None
        user = await users.user_by_email(session, args.email)
        key = args.idempotency_key or f"cli:{secrets.token_hex(12)}"
        result = await ledger.topup(session.bind, key, user.id, amount)  # type: ignore[arg-type]
        return f"{result.tx_id} {'(already granted)' if result.replayed else ''}".strip()

    async def set_limits(session: AsyncSession) -> str:
        for value in (args.rpm, args.tpm):
            if value is not None and value <= 0:
                raise users.AccountError("limits must be positive")
        await users.set_key_limits(session, args.key_id, args.rpm, args.tpm)
        return f"key {args.key_id}: rpm={args.rpm or 'default'} tpm={args.tpm or 'default'}"

    async def edit_models(session: AsyncSession) -> str:
        conn = await session.connection()
        directory = await catalog.load_from(conn)
        command = args.models_command
        if command == "list":
            return "\n".join(msgspec.json.encode(info).decode() for info in directory.entries.values())
        if command == "remove":
            if directory.get(args.slug) is None:
                raise users.AccountError(f"no model {args.slug!r} in the directory")
            await catalog.remove(conn, args.slug)
            return f"removed {args.slug}"
        if command == "alias":
            current = directory.get(args.slug)
            if current is None:
                raise users.AccountError(f"no model {args.slug!r} in the directory")
            info = msgspec.structs.replace(current, aliases=(*current.aliases, *args.alias))
        else:
            info = catalog.ModelInfo(
                slug=args.slug,
                display_name=args.display_name,
                family=args.family,
                parameter_count=args.parameter_count,
                context_window=args.context_window,
                use_cases=tuple(args.use_case),
                quantizations=tuple(args.quantization),
                aliases=tuple(args.alias),
                max_price_in=args.max_price_in,
                max_price_out=args.max_price_out,
                dimensions=args.dimensions,
                matryoshka=args.matryoshka,
            )
        try:
            directory.check_names(info)
            await catalog.save(conn, info)
        except catalog.DirectoryError as exc:
            raise users.AccountError(str(exc)) from None
        return f"saved {info.slug}"

    async def set_policy(session: AsyncSession) -> str:
        try:
            policy = msgspec.json.decode(args.policy, type=KeyPolicy).check()
        except (msgspec.ValidationError, msgspec.DecodeError, PolicyError) as exc:
            raise users.AccountError(f"--policy: {exc}") from None
        if not await users.set_key_policy(session, args.key_id, policy):
            raise users.AccountError(f"no live key with id {args.key_id}")
        return f"policy of key {args.key_id}: {msgspec.json.encode(policy).decode()} (coordinators read it within 1 s)"

    async def vouch(session: AsyncSession) -> str:
        return await references.vouch(session, args.email, args.admin_command == "vouch")

    actions = {
        "models": edit_models,
        "vouch": vouch,
        "unvouch": vouch,
        "create-user": create_user,
        "approve-user": approve_user,
        "pending-users": pending_users,
        "set-role": set_role,
        "create-key": create_key,
        "create-agent-token": create_token,
        "grant-credits": grant_credits,
        "set-key-limits": set_limits,
        "set-key-policy": set_policy,
    }
    return asyncio.run(_with_session(settings, actions[args.admin_command]))


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from coordinator.app import create_app
    from coordinator.core import deadlines
    from coordinator.web.server import DrainingServer

    asyncio.run(_migrate(settings))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=deadlines.protocol(settings.header_timeout, settings.body_timeout),
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        proxy_headers=True,  # the client's address from a load balancer's X-Forwarded-For, for per-address limits
        forwarded_allow_ips=settings.trusted_proxies,
    )
    DrainingServer(config, app.state.pool).run()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"pool-coordinator: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        if args.command == "serve":
            _serve(args, settings)
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
            print("migrations applied", file=sys.stderr)
        else:
            print(_admin(args, settings))
    except users.AccountError as exc:
        print(f"pool-coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
