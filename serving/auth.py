"""Who may call what: the API's bearer tokens (SHA-256 digests by name, each with a role)
and the start-up checks that refuse to run an exposed API open. No Ray in here."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass

from persona.errors import ConfigError
from persona.settings import Settings
from serving.views import ApiError

log = logging.getLogger(__name__)

# Each role may do what the roles before it may.
ROLES = ("read", "write", "admin")
# The name PERSONA_API_TOKEN (plaintext, for compatibility) goes by: one admin token.
PLAINTEXT_NAME = "api_token"
# A name scopes its client's Idempotency-Keys ("<name>:<key>"), so it holds no ":".
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def token_digest(settings: Settings) -> str:
    """SHA-256 of PERSONA_API_TOKEN, "" when none is set. Surrounding whitespace is not
    part of it: a token read from a mounted secret usually ends in a newline."""
    if not settings.api_token:
        return ""
    token = settings.api_token.strip()
    if not token:
        raise ConfigError(
            "PERSONA_API_TOKEN holds only whitespace: set a token, or unset it to turn auth off"
        )
    return hashlib.sha256(token.encode()).hexdigest()


def access_tokens(settings: Settings) -> dict[str, dict]:
    """Every token the API accepts, by name: {"sha256": [digests], "role"}. That is
    PERSONA_API_TOKENS, checked, plus PERSONA_API_TOKEN's digest as the admin token
    "api_token". Errors name the entry, never its value (it may be a pasted secret)."""
    tokens: dict[str, dict] = {}
    for name, entry in settings.api_tokens.items():
        where = f"PERSONA_API_TOKENS[{name!r}]"
        if not isinstance(name, str) or not _NAME.match(name) or name == "anonymous":
            raise ConfigError(
                f"{where}: a token name is 1-64 letters, digits, '.', '_' or '-' "
                "(and not 'anonymous')"
            )
        if not isinstance(entry, dict) or set(entry) != {"sha256", "role"}:
            raise ConfigError(f'{where}: give {{"sha256": "<hex digest>", "role": "..."}}')
        if entry["role"] not in ROLES:
            raise ConfigError(f"{where}: the role is one of {', '.join(ROLES)}")
        digests = entry["sha256"] if isinstance(entry["sha256"], list) else [entry["sha256"]]
        digests = [d.lower() if isinstance(d, str) else d for d in digests]
        if not digests or not all(isinstance(d, str) and _DIGEST.match(d) for d in digests):
            raise ConfigError(
                f"{where}: sha256 is the token's SHA-256 digest, 64 hex digits (or a list "
                "of them), never the token: `printf %s TOKEN | sha256sum`"
            )
        tokens[name] = {"sha256": digests, "role": entry["role"]}
    plaintext = token_digest(settings)
    if plaintext:
        if PLAINTEXT_NAME in tokens:
            raise ConfigError(
                f"PERSONA_API_TOKENS names a token {PLAINTEXT_NAME!r}, the name of "
                "PERSONA_API_TOKEN: rename one"
            )
        tokens[PLAINTEXT_NAME] = {"sha256": [plaintext], "role": "admin"}
    owners: dict[str, str] = {}
    for name, entry in tokens.items():
        for digest in entry["sha256"]:
            if owners.setdefault(digest, name) != name:
                raise ConfigError(
                    f"tokens {owners[digest]!r} and {name!r} have the same digest: "
                    "one token, one name"
                )
    return tokens


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def refuse_open_exposure(settings: Settings, tokens: dict[str, dict]) -> None:
    """Raise ConfigError for an app that would run open where it should not: reads
    protected by no token, or no token on an address other hosts can reach (unless
    anonymous writes are allowed explicitly, which is logged loudly)."""
    if tokens:
        return
    if settings.protect_reads:
        raise ConfigError(
            "PERSONA_PROTECT_READS=1 with no token would protect nothing: set "
            "PERSONA_API_TOKENS (or PERSONA_API_TOKEN)"
        )
    if is_loopback(settings.bind_host):
        return
    if not settings.allow_anonymous_writes:
        raise ConfigError(
            f"the API binds {settings.bind_host} (PERSONA_BIND_HOST) with no token: anyone "
            "who reaches it could write, delete and replace the catalog. Set "
            "PERSONA_API_TOKENS (or PERSONA_API_TOKEN), or PERSONA_ALLOW_ANONYMOUS_WRITES=1 "
            "if that is really what you want"
        )
    log.warning(
        "PERSONA_ALLOW_ANONYMOUS_WRITES=1: the API binds %s with no token, so ANYONE who "
        "reaches it can write events, delete users and replace the catalog",
        settings.bind_host,
    )


@dataclass(frozen=True)
class Caller:
    """The token a request presented: its name and role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class TokenTable:
    """The accepted tokens of one replica (digests only), and who a request is."""

    def __init__(self, tokens: dict[str, dict]):
        self._entries = [
            (digest, Caller(name, entry["role"]))
            for name, entry in tokens.items()
            for digest in entry["sha256"]
        ]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller's token; None when no Authorization header was sent; 403 for a
        credential that is no known token. Every digest is compared, in constant time."""
        if not authorization or not authorization.strip():
            return None
        scheme, _, credential = authorization.strip().partition(" ")
        digest = hashlib.sha256(credential.strip().encode()).hexdigest()
        found = None
        for known, caller in self._entries:
            if hmac.compare_digest(digest, known):
                found = caller
        if scheme.lower() != "bearer" or found is None:
            raise ApiError(403, "forbidden", "the bearer token is not valid")
        return found

    def authorize(self, authorization: str | None, role: str | None) -> Caller | None:
        """The caller, allowed `role`: 401 without a token, 403 for an unknown one or a
        lower role. None when the call is open (no role needed, or no token configured)."""
        if role is None or not self:
            return None
        caller = self.identify(authorization)
        if caller is None:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        if not caller.may(role):
            raise ApiError(
                403,
                "forbidden",
                f"this call needs a token with the {role!r} role or above; "
                f"{caller.name!r} has {caller.role!r}",
            )
        return caller


def client_scope(caller: Caller | None) -> str:
    """Whose Idempotency-Keys these are: the token's name, or "anonymous". Two clients
    that both send `req-1` never swallow each other's batch; a client whose token is
    rotated under the same name keeps its keys, one given a new name does not."""
    return caller.name if caller is not None else "anonymous"
