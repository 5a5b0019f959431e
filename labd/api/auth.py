"""Bearer-token authentication and roles for the API.

Roles are ordered: ``viewer`` (read everything) < ``technician`` (run and control protocols, add
to the queue, move and remove their own queue items) < ``admin`` (edit everyone's queue items,
clear the queue, configuration, tokens). A route declares the least role it needs with
``Depends(require(Role.X))``; the dependency runs before the route's body, so a refused request
changes nothing. No token or a bad one: 401 (with ``WWW-Authenticate: Bearer``); a role too low:
403 naming the role needed.

On first start (no token at all in the database) :func:`bootstrap_admin` creates an ``admin``
token, writes it to ``<data_dir>/admin.token`` (mode 0600) and logs it once with that path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request, status

from .tokens import Role, TokenInfo, TokenStore

log = logging.getLogger("labd.api")

ADMIN_TOKEN_FILE = "admin.token"
#: Clients name themselves in this header (``labctl``, ``web``); the default is ``api``.
CLIENT_HEADER = "X-Labd-Client"
_CLIENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's user name and role, and where the call comes from."""

    name: str
    role: Role
    token_id: str
    #: ``<client>@<address>``, e.g. ``labctl@127.0.0.1``: recorded as a run's ``source``.
    source: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": str(self.role), "token_id": self.token_id,
                "source": self.source}


def client_source(client_name: str | None, address: str | None) -> str:
    name = client_name if client_name and _CLIENT_RE.match(client_name) else "api"
    return f"{name}@{address or 'unknown'}"


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def identify(tokens: TokenStore, token: str | None, source: str) -> Principal | None:
    if not token:
        return None
    info: TokenInfo | None = await asyncio.to_thread(tokens.verify, token)
    if info is None:
        return None
    return Principal(info.name, info.role, info.token_id, source)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail,
                         headers={"WWW-Authenticate": "Bearer"})


def forbidden(principal: Principal, needed: Role, what: str = "this") -> HTTPException:
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"{what} needs the {needed} role; {principal.name} is a {principal.role}",
    )


def require(role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the caller, who must hold at least ``role``."""

    async def dependency(request: Request) -> Principal:
        token = bearer(request.headers.get("authorization"))
        if token is None:
            raise unauthorized("missing bearer token (Authorization: Bearer <token>)")
        source = client_source(request.headers.get(CLIENT_HEADER),
                               request.client.host if request.client else None)
        principal = await identify(request.app.state.tokens, token, source)
        if principal is None:
            raise unauthorized("invalid or revoked token")
        if not principal.role.allows(role):
            raise forbidden(principal, role)
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


def bootstrap_admin(tokens: TokenStore, data_dir: Path) -> Path | None:
    """Create the first admin token if the database has none; return the file it is in."""
    if not tokens.is_empty():
        return None
    token, _ = tokens.create("admin", Role.ADMIN, created_by="bootstrap")
    path = data_dir / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file was already there with other bits
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    # The secret goes to the file only: a log line ends up in journald, readable by more people.
    log.warning("bootstrap admin token %s created; the token is in %s (mode 0600): "
                "LABD_TOKEN_FILE=%s labctl ...; create personal tokens with "
                "`labctl token create NAME --role ROLE`", token.split(".", 1)[0], path, path)
    return path
