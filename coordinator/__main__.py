"""``pool-coordinator``: serve, migrate, admin."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from coordinator import accounts, db
from coordinator.settings import Settings, SettingsError
from shared import logs


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
    for name, what in (
        ("create-key", "a consumer key (pool_live_…)"),
        ("create-agent-token", "an agent token"),
    ):
        sub = admin_commands.add_parser(name, help=f"create {what}; prints only the secret")
        sub.add_argument("--email", required=True)
        sub.add_argument("--name", default="")
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
        user = await accounts.create_user(session, args.email)
        return str(user.id)

    async def create_key(session: AsyncSession) -> str:
        return await accounts.create_api_key(session, args.email, args.name)

    async def create_token(session: AsyncSession) -> str:
        return await accounts.create_agent_token(session, args.email, args.name)

    actions = {"create-user": create_user, "create-key": create_key, "create-agent-token": create_token}
    return asyncio.run(_with_session(settings, actions[args.admin_command]))


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from coordinator.app import create_app

    asyncio.run(_migrate(settings))
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


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
    except accounts.AccountError as exc:
        print(f"pool-coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
