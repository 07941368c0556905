"""Who may do what at the serving API: API keys with a role, and the per-response feedback token.
Owns the tables api_keys and signing_keys: every statement on them is here.

    role       may                                                   a correction from it
    client     ask (/v1/generate); rate the answers it received      waits for review
    rater      rate any served answer (annotators)                   waits for review
    reviewer   rate any answer; accept or reject corrections         enters training (trusted)
    no key     ask (when generate is open); rate an answer only      waits for review
               with the feedback_token that came with it

Keys are 256-bit random strings shown once at creation and stored as their SHA-256: a key that
random cannot be guessed from its hash, so a slow password hash would buy nothing and cost a
round of key stretching on every request. The feedback token is an HMAC of the response id with a
secret kept in the database (never in a process argument, a deployment's arguments or Ray's GCS):
only whoever received the answer holds it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa

KEY_PREFIX = "llk_"
ROLES = ("client", "rater", "reviewer")
RATES_ANY_ANSWER = frozenset({"rater", "reviewer"})
TRUSTED_CORRECTIONS = frozenset({"reviewer"})
REVIEWS_CORRECTIONS = frozenset({"reviewer"})
FEEDBACK_TOKEN_SECRET = "feedback_token"  # nosec B105


class CredentialError(ValueError):
    """A key operation that cannot be done; the message names the key or setting."""


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    role: str
    key_prefix: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    @property
    def identity(self) -> str:
        """The rater identity of everything this key sends."""
        return f"key:{self.name}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_COLUMNS = "id, name, role, key_prefix, created_by, created_at, revoked_at, revoked_by"


def create_key(engine: sa.Engine, name: str, role: str, created_by: str) -> tuple[ApiKey, str]:
    """A new key: (its record, the key itself, to be shown once and never again)."""
    if role not in ROLES:
        raise CredentialError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    # A name is printed by `keys list` and written to logs: no control characters, spaces or quotes.
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise CredentialError("a key's name must be 1 to 64 letters, digits, '.', '_' or '-'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with engine.begin() as connection:
            row = connection.execute(
                sa.text(f"INSERT INTO api_keys (name, role, key_hash, key_prefix, created_by) "
                        f"VALUES (:name, :role, :hash, :prefix, :by) RETURNING {_COLUMNS}"),
                {"name": name, "role": role, "hash": hash_key(key), "prefix": key[:10], "by": created_by},
            ).mappings().one()
    except sa.exc.IntegrityError:
        raise CredentialError(f"a key named {name!r} exists already (names are never reused)") from None
    return ApiKey(**row), key


def list_keys(engine: sa.Engine) -> list[ApiKey]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")).mappings()
        return [ApiKey(**row) for row in rows]


def revoke_key(engine: sa.Engine, name: str, revoked_by: str) -> ApiKey:
    with engine.begin() as connection:
        row = connection.execute(
            sa.text(f"UPDATE api_keys SET revoked_at = now(), revoked_by = :by "
                    f"WHERE name = :name AND revoked_at IS NULL RETURNING {_COLUMNS}"),
            {"name": name, "by": revoked_by}).mappings().first()
        if row is None:
            known = connection.execute(sa.text("SELECT revoked_at FROM api_keys WHERE name = :name"),
                                       {"name": name}).first()
            raise CredentialError(f"no key named {name!r}" if known is None
                                  else f"key {name!r} was revoked at {known.revoked_at:%Y-%m-%d %H:%M:%S}")
    return ApiKey(**row)


def authenticate(engine: sa.Engine, key: str) -> ApiKey | None:
    """The live key `key` is, or None (unknown or revoked): one indexed lookup of its hash."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = :hash AND revoked_at IS NULL"),
            {"hash": hash_key(key)}).mappings().first()
    return ApiKey(**row) if row is not None else None


def signing_secret(engine: sa.Engine, name: str = FEEDBACK_TOKEN_SECRET) -> bytes:
    """The secret `name` (32 random bytes), made on first use; every replica reads the same one."""
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO signing_keys (name, secret) VALUES (:name, :secret) "
                                   "ON CONFLICT (name) DO NOTHING"),
                           {"name": name, "secret": secrets.token_bytes(32)})
        return bytes(connection.execute(sa.text("SELECT secret FROM signing_keys WHERE name = :name"),
                                        {"name": name}).scalar_one())


def read_signing_secret(engine: sa.Engine, name: str = FEEDBACK_TOKEN_SECRET) -> bytes:
    """The secret `name`, read only: the replicas' role may not create one (serving_deployment
    makes it, with `signing_secret`, before any replica starts)."""
    with engine.connect() as connection:
        secret = connection.execute(sa.text("SELECT secret FROM signing_keys WHERE name = :name"),
                                    {"name": name}).scalar()
    if secret is None:
        raise RuntimeError(f"signing key {name!r} is missing: serving_deployment creates it; "
                           "materialize serving_deployment rather than starting the app by hand")
    return bytes(secret)


def feedback_token(secret: bytes, response_id: str) -> str:
    """The token that lets whoever received answer `response_id` rate it (43 URL-safe characters)."""
    digest = hmac.new(secret, str(response_id).lower().encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_matches(secret: bytes, response_id: str, token: str) -> bool:
    return hmac.compare_digest(feedback_token(secret, response_id), token)


@dataclass(frozen=True)
class RatingCredential:
    """What a rating's credential makes of it: who rated (for counting once) and whether it counts."""

    rater: str  # key:<name>, receiver:<key name>, token:<response id>, or anonymous
    credential: str  # api_key, feedback_token or none
    api_key_id: int | None
    counts: bool
    reason: str
    # Who stands behind the rating, for the loop's counts (one actor, one vote): its key, else
    # the key that asked for the answer, else the asker's host ("host:<budget host>").
    actor: str = "host:unknown"


def judge_rating(key: ApiKey | None, response_id: str, receiver: ApiKey | None,
                 token_valid: bool | None, asker_host: str | None = None) -> RatingCredential:
    """Whether a rating of answer `response_id` counts, from its credentials: the API key it came
    with (`key`), the key that asked for the answer (`receiver`), and its feedback token (None: no
    token sent). The rater identity of a token is the answer's receiver, so whoever received an
    answer rates it once, however many client ids or requests they invent. The actor is the key,
    else whoever asked: the receiver's key, else `asker_host` (the asker's budget host), so a host
    that asks 30 questions without a key and rates each answer by its token is one actor."""
    actor = (key.identity if key is not None else receiver.identity if receiver is not None
             else f"host:{asker_host or 'unknown'}")
    return replace(_judged(key, response_id, receiver, token_valid), actor=actor)


def _judged(key: ApiKey | None, response_id: str, receiver: ApiKey | None,
            token_valid: bool | None) -> RatingCredential:
    receiver_identity = receiver.identity if receiver else f"token:{response_id}"
    if key is not None:
        key_id = key.id
        if key.role in RATES_ANY_ANSWER:
            return RatingCredential(key.identity, "api_key", key_id, True, f"{key.role} key {key.name}")
        if receiver is not None and receiver.id == key.id:
            return RatingCredential(key.identity, "api_key", key_id, True,
                                    f"key {key.name} received this answer")
        if token_valid:
            return RatingCredential(receiver_identity, "feedback_token", key_id, True,
                                    "feedback token of this answer")
        return RatingCredential(key.identity, "api_key", key_id, False,
                                f"{key.role} key {key.name} did not receive this answer")
    if token_valid:
        return RatingCredential(receiver_identity, "feedback_token", None, True,
                                "feedback token of this answer")
    if token_valid is False:
        return RatingCredential("anonymous", "none", None, False,
                                "feedback_token does not belong to this answer")
    return RatingCredential("anonymous", "none", None, False,
                            "no credential: send the feedback_token /v1/generate returned, or an API key")
