"""API tokens, stored hashed in the daemon's SQLite database (a table of their own).

A token is ``labd_<id>.<secret>``: ``id`` (12 hex digits) names the row, ``secret`` is 32 random
bytes (URL-safe base64). Only ``sha256(token)`` is stored: the secret is high-entropy, so a plain
hash is enough (no salt or slow KDF is needed against guessing), and a stolen database does not
give a usable token. Verification looks the row up by its id and compares the hashes with
:func:`hmac.compare_digest`, so the time taken says nothing about how much of a guess was right.

A token belongs to a user name (what the start documents record as ``user``) and has one role.
At most one active token per name: a second ``create`` for the same name is refused, so that
``revoke NAME`` is never ambiguous. Revoked tokens stay in the table (who had access, and when).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id     TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    hash         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    created_by   TEXT NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active_name
    ON api_tokens(name) WHERE revoked_at IS NULL;
"""

PREFIX = "labd_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: ``last_used_at`` is written at most this often per token (not a write per request).
_TOUCH_EVERY_S = 60.0


class Role(StrEnum):
    VIEWER = "viewer"
    TECHNICIAN = "technician"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.TECHNICIAN: 1, Role.ADMIN: 2}


class TokenError(ValueError):
    """A token operation that cannot be done (bad name, name taken, unknown token)."""


@dataclass(frozen=True)
class TokenInfo:
    """A token's row, without its secret or hash."""

    token_id: str
    name: str
    role: Role
    created_at: float
    created_by: str
    last_used_at: float | None
    revoked_at: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"] = str(self.role)
        d["active"] = self.revoked_at is None
        return d


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def split_token(token: str) -> str | None:
    """The id part of a well-formed token, or None."""
    if not token.startswith(PREFIX) or "." not in token:
        return None
    token_id, _, secret = token[len(PREFIX):].partition(".")
    if len(token_id) != 12 or not secret or not all(c in "0123456789abcdef" for c in token_id):
        return None
    return token_id


class TokenStore:
    """Thread-safe (one connection, one lock). Every call blocks on SQLite: from the event loop,
    call it through an executor (``asyncio.to_thread``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._touched: dict[str, float] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, name: str, role: Role | str, created_by: str) -> tuple[str, TokenInfo]:
        """A new token for ``name``; returns ``(token, info)``. The token is not kept."""
        if not NAME_RE.match(name):
            raise TokenError(f"bad user name {name!r}: 1-64 letters, digits, '_', '.', '@', '-'")
        try:
            role = Role(role)
        except ValueError:
            raise TokenError(f"bad role {role!r}: one of viewer, technician, admin") from None
        token_id = secrets.token_hex(6)
        token = f"{PREFIX}{token_id}.{secrets.token_urlsafe(32)}"
        now = time.time()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO api_tokens (token_id, name, role, hash, created_at, created_by) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (token_id, name, str(role), hash_token(token), now, created_by),
                )
            except sqlite3.IntegrityError:
                raise TokenError(f"{name!r} already has an active token "
                                 "(revoke it first)") from None
        return token, TokenInfo(token_id, name, role, now, created_by, None, None)

    def verify(self, token: str) -> TokenInfo | None:
        """The active token's info, or None (unknown, malformed, revoked or wrong secret)."""
        token_id = split_token(token)
        if token_id is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM api_tokens WHERE token_id = ?",
                                   (token_id,)).fetchone()
        expected = row["hash"] if row is not None else hash_token("")
        ok = hmac.compare_digest(expected, hash_token(token))
        if row is None or not ok or row["revoked_at"] is not None:
            return None
        now = time.time()
        if now - self._touched.get(token_id, 0.0) > _TOUCH_EVERY_S:
            self._touched[token_id] = now
            with self._lock:
                self._db.execute("UPDATE api_tokens SET last_used_at = ? WHERE token_id = ?",
                                 (now, token_id))
        return self._info(row)

    def list(self, include_revoked: bool = False) -> list[TokenInfo]:
        sql = "SELECT * FROM api_tokens"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at").fetchall()
        return [self._info(r) for r in rows]

    def revoke(self, name_or_id: str) -> TokenInfo:
        """Revoke the active token with this id or of this user name."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM api_tokens WHERE revoked_at IS NULL AND (token_id = ? OR name = ?)",
                (name_or_id, name_or_id),
            ).fetchone()
            if row is None:
                raise TokenError(f"no active token with id or name {name_or_id!r}")
            now = time.time()
            self._db.execute("UPDATE api_tokens SET revoked_at = ? WHERE token_id = ?",
                             (now, row["token_id"]))
        info = self._info(row)
        return TokenInfo(info.token_id, info.name, info.role, info.created_at, info.created_by,
                         info.last_used_at, now)

    def count_active(self, role: Role | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM api_tokens WHERE revoked_at IS NULL", ()
        if role is not None:
            sql, args = sql + " AND role = ?", (str(role),)
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def is_empty(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM api_tokens").fetchone()[0] == 0

    @staticmethod
    def _info(r: sqlite3.Row) -> TokenInfo:
        return TokenInfo(r["token_id"], r["name"], Role(r["role"]), r["created_at"],
                         r["created_by"], r["last_used_at"], r["revoked_at"])
