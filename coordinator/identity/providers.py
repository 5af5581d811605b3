"""Providers' public faces: a slug (unique, URL-safe, used in ``provider.order/only/ignore``), a
display name, an optional website and description.

A provider gets a profile when its first agent connects: slug ``provider-<id>``, name ``Provider
<id>`` (nothing taken from the account's e-mail address, which stays private). Every slug a provider
has had keeps naming it (``provider_slugs``): a consumer's ``provider.only`` list written with an old
slug never lands on whoever would take that slug next, because nobody can. Names are unique ignoring
case, spacing and punctuation, so one provider can't pass for another by display name either.

:class:`ProviderBook` keeps every profile in memory (each process reads what changed every few
seconds), so resolving a slug on a request's path asks the database nothing."""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from coordinator.core.models import ProviderProfile, ProviderSlug

SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
DEFAULT_SLUG = re.compile(r"provider-(\d+)")
DEFAULT_NAME = re.compile(r"provider(\d+)")  # a name key
RESERVED = frozenset({"platform", "auto", "me", "new", "admin", "api", "providers", "status"})
NAME_MAX, WEBSITE_MAX, DESCRIPTION_MAX = 60, 200, 500
LOOKALIKE_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC"})  # scripts with letters that pass for each other
MAX_SLUGS = 5  # slugs one provider may ever have (each stays its own): nobody hoards names
# Rows other processes committed late, or stamped by a clock a little behind, are read again; and
# every FULL_RELOAD-th refresh reads everything, whatever the clocks did.
REFRESH_OVERLAP = timedelta(seconds=60)
FULL_RELOAD = 60


class ProfileError(Exception):
    """A profile change that can't be made; ``field`` names what to fix (the API's ``param``)."""

    def __init__(self, field: str, message: str, *, taken: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.taken = taken  # another provider has (or had) it: a conflict, not a malformed value


@dataclass(frozen=True, slots=True)
class Profile:
    user_id: int
    slug: str
    name: str
    website: str | None
    description: str | None
    joined_at: datetime


def _profile(row: ProviderProfile) -> Profile:
    return Profile(row.user_id, row.slug, row.name, row.website, row.description, row.joined_at)


def name_key(name: str) -> str:
    """What two names must not share: letters and digits, compatibility-normalised and case folded
    (``Acme GPU`` = ``acme-gpu``, and full-width letters as their plain forms)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", name).casefold() if ch.isalnum())[:NAME_MAX]


def check_slug(slug: str, user_id: int) -> str:
    slug = slug.strip().lower()
    if not SLUG.fullmatch(slug) or not any(ch.isalpha() for ch in slug):
        raise ProfileError(
            "slug",
            "`slug` must be 1-40 of a-z, 0-9 and '-', with a letter, starting and ending with a letter or digit.",
        )
    default = DEFAULT_SLUG.fullmatch(slug)
    if slug in RESERVED or (default is not None and int(default[1]) != user_id):
        raise ProfileError("slug", f"The slug {slug!r} is reserved.")
    return slug


def check_name(name: str, user_id: int) -> str:
    name = " ".join(name.split())
    key = name_key(name)
    if not 2 <= len(name) <= NAME_MAX or len(key) < 2 or not name.isprintable():
        raise ProfileError("name", f"`name` must be 2-{NAME_MAX} printable characters, two of them letters or digits.")
    default = DEFAULT_NAME.fullmatch(key)
    if key in RESERVED or (default is not None and int(default[1]) != user_id):
        raise ProfileError("name", f"The name {name!r} is reserved.")
    for word in re.split(r"\W+", name):
        scripts = {unicodedata.name(ch, "?").split()[0] for ch in word if ch.isalpha()} & LOOKALIKE_SCRIPTS
        if len(scripts) > 1:  # "Alpha" spelt with a Cyrillic capital A would pass for the Latin one
            raise ProfileError("name", "A word of `name` must not mix Latin, Greek and Cyrillic letters.")
    return name


def check_website(website: str | None) -> str | None:
    if website is None or not website.strip():
        return None
    website = website.strip()
    parts = urlsplit(website)
    if (
        len(website) > WEBSITE_MAX
        or parts.scheme not in ("https", "http")
        or not parts.hostname
        or "." not in parts.hostname
        or parts.username is not None
        or any(ch.isspace() for ch in website)
    ):
        raise ProfileError("website", f"`website` must be an http(s) address of at most {WEBSITE_MAX} characters.")
    return website


def check_description(description: str | None) -> str | None:
    if description is None or not description.strip():
        return None
    description = description.strip()
    if len(description) > DESCRIPTION_MAX or any(not ch.isprintable() and ch not in "\n\t" for ch in description):
        raise ProfileError("description", f"`description` must be at most {DESCRIPTION_MAX} printable characters.")
    return description


async def ensure(session: AsyncSession, user_id: int) -> Profile:
    """The provider's profile, made with the defaults if it has none (its first agent's hello)."""
    row = await session.get(ProviderProfile, user_id)
    if row is not None:
        return _profile(row)
    now = datetime.now(UTC)
    slug, name = f"provider-{user_id}", f"Provider {user_id}"
    try:
        async with session.begin_nested():
            session.add(ProviderSlug(slug=slug, user_id=user_id, created_at=now))
            session.add(
                ProviderProfile(
                    user_id=user_id, slug=slug, name=name, name_key=name_key(name), joined_at=now, updated_at=now
                )
            )
    except IntegrityError:  # another process made it first
        pass
    row = await session.get(ProviderProfile, user_id, populate_existing=True)
    assert row is not None
    return _profile(row)


def default_profile(user_id: int) -> Profile:
    """What a provider is called until it chooses (never anything from its account's e-mail)."""
    return Profile(user_id, f"provider-{user_id}", f"Provider {user_id}", None, None, datetime.now(UTC))


async def update_profile(
    session: AsyncSession,
    user_id: int,
    *,
    slug: str | None = None,
    name: str | None = None,
    website: str | None = None,
    description: str | None = None,
    clear: frozenset[str] = frozenset(),
) -> Profile:
    """Change what is given (``clear``: set ``website``/``description`` to nothing). Everything is
    checked before anything is written; a slug or name another provider has (or had) is a
    :class:`ProfileError` with ``taken``, and so is a slug past :data:`MAX_SLUGS`."""
    current = await ensure(session, user_id)
    values: dict[str, object] = {}
    new_slug = None
    if slug is not None and (slug := check_slug(slug, user_id)) != current.slug:
        owner = await session.scalar(select(ProviderSlug.user_id).where(ProviderSlug.slug == slug))
        if owner is not None and owner != user_id:
            raise ProfileError("slug", f"The slug {slug!r} is taken.", taken=True)
        if owner is None:
            had = await session.scalar(select(func.count()).where(ProviderSlug.user_id == user_id))
            if (had or 0) >= MAX_SLUGS:
                raise ProfileError(
                    "slug",
                    f"A provider keeps every slug it had and may have {MAX_SLUGS}; go back to one of yours.",
                    taken=True,
                )
            new_slug = slug
        values["slug"] = slug
    if name is not None and (name := check_name(name, user_id)) != current.name:
        key = name_key(name)
        other = await session.scalar(
            select(ProviderProfile.user_id).where(ProviderProfile.name_key == key, ProviderProfile.user_id != user_id)
        )
        if other is not None:
            raise ProfileError("name", f"The name {name!r} is taken.", taken=True)
        values.update(name=name, name_key=key)
    if website is not None or "website" in clear:
        values["website"] = check_website(website)
    if description is not None or "description" in clear:
        values["description"] = check_description(description)
    if values:
        values["updated_at"] = datetime.now(UTC)
        try:
            async with session.begin_nested():
                if new_slug is not None:
                    session.add(ProviderSlug(slug=new_slug, user_id=user_id, created_at=datetime.now(UTC)))
                    await session.flush()
                await session.execute(
                    update(ProviderProfile).where(ProviderProfile.user_id == user_id).values(**values)
                )
        except IntegrityError:  # the slug or name taken by another process at the same moment
            raise ProfileError("slug" if new_slug else "name", "That is taken.", taken=True) from None
    row = await session.get(ProviderProfile, user_id, populate_existing=True)
    assert row is not None
    return _profile(row)


class ProviderBook:
    """Every provider's profile and slugs (old ones too), in memory; :meth:`refresh` reads what
    changed since the last read, and a change made by this process is :meth:`put` at once."""

    def __init__(self) -> None:
        self.by_user: dict[int, Profile] = {}
        self.by_slug: dict[str, int] = {}
        self._since = datetime.fromtimestamp(0, UTC)
        self._refreshes = 0
        self.refreshed = 0.0  # monotonic time of the last read

    def put(self, profile: Profile) -> None:
        self.by_user[profile.user_id] = profile
        self.by_slug[profile.slug] = profile.user_id

    def get(self, user_id: int) -> Profile | None:
        return self.by_user.get(user_id)

    def find(self, slug: str) -> Profile | None:
        """The provider a slug (current or old) names."""
        user_id = self.by_slug.get(slug.lower())
        return None if user_id is None else self.by_user.get(user_id)

    def resolve(self, name: str) -> str:
        """How placement names a provider (its id) for a name a consumer wrote: a provider's slug,
        current or old, becomes its id; anything else (an id, an agent id, ``platform``) stays."""
        user_id = self.by_slug.get(name.lower())
        return name if user_id is None else str(user_id)

    async def refresh(self, engine: AsyncEngine) -> None:
        self._refreshes += 1
        whole = self._refreshes % FULL_RELOAD == 1
        since = datetime.fromtimestamp(0, UTC) if whole else self._since - REFRESH_OVERLAP
        async with engine.connect() as conn:
            profiles = (await conn.execute(select(ProviderProfile).where(ProviderProfile.updated_at >= since))).all()
            slugs = (
                await conn.execute(
                    select(ProviderSlug.slug, ProviderSlug.user_id, ProviderSlug.created_at).where(
                        ProviderSlug.created_at >= since
                    )
                )
            ).all()
        latest = self._since
        for row in profiles:
            self.put(Profile(row.user_id, row.slug, row.name, row.website, row.description, row.joined_at))
            latest = max(latest, row.updated_at)
        for slug, user_id, created_at in slugs:
            self.by_slug[slug] = user_id
            latest = max(latest, created_at)
        self._since = min(latest, datetime.now(UTC))  # a row stamped by a clock ahead of ours can't skip others
        self.refreshed = time.monotonic()
