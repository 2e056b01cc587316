"""Credentials: the clients' tokens this service checks, and the key it sends to TorchServe.

Each client has a token and a name; a job belongs to the client that submitted it (store.py). Why tokens of
its own rather than TorchServe's inference key: TorchServe 0.12 makes a new key at every start and
one per pod, and the key expires (token_expiration_min); a job is fetched minutes or hours after it was
submitted, possibly from another replica, so its clients need a token that outlives TorchServe's restarts. The
service keeps TorchServe's key to itself and renews it, as the playground and the cluster's auth proxy do.
"""

import hmac
import json
import logging
import os
import re
import secrets
import time
from datetime import datetime
from pathlib import Path

import aiohttp

logger = logging.getLogger(__name__)


DEFAULT_CLIENT = "default"  # the client of a token file that holds one token alone
CLIENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,16}")  # short: "<client>:<job id>.<run>" names a run (store.py)
RELOAD_EVERY_SECONDS = 2.0  # a changed file (a Secret updated in place) is read again within this


def load_or_create_token(path: Path) -> str:
    """The token in `path`; a new random one written there (0600) when the file does not exist."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(token + "\n")
        logger.info("jobs: wrote a new client token to %s", path)
    if not token:
        raise ValueError(f"{path} holds no token")
    return token


def parse_clients(text: str, source: str = "the token file") -> dict[str, str]:
    """client name -> token, from a token file: `name token` lines (blank lines and # comments skipped), or one
    token alone, which is the client `default`'s."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) == 1 and len(lines[0].split()) == 1:
        return {DEFAULT_CLIENT: lines[0]}
    clients = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != 2 or not CLIENT_NAME.fullmatch(fields[0]):
            raise ValueError(f"{source}: line {number} is not `name token` with a name of 1 to 16 letters, digits, "
                             f"'-' or '_'")
        if fields[0] in clients or fields[1] in clients.values():
            raise ValueError(f"{source}: line {number} repeats a client's name or token")
        clients[fields[0]] = fields[1]
    if not clients:
        raise ValueError(f"{source} holds no token")
    return clients


def token_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header is `Bearer <token>` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class Clients:
    """The clients and their tokens, from the token file (created with one random token when it does not exist),
    read again when the file changes; a file that cannot be read then keeps the clients read before."""

    def __init__(self, path: Path):
        self.path = path
        load_or_create_token(path)  # writes one when there is none
        self.tokens = parse_clients(path.read_text(), str(path))
        self._read_at = self._stamp()
        self._checked_at = time.monotonic()

    def _stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def client(self, header: str | None) -> str | None:
        """The client whose token an Authorization header (`Bearer <token>`) carries, or None. Every token is
        compared, in constant time."""
        self._reload()
        scheme, _, given = (header or "").partition(" ")
        given = given.strip().encode()
        found = None
        for name, token in self.tokens.items():
            if hmac.compare_digest(given, token.encode()):
                found = name
        return found if scheme.lower() == "bearer" else None

    def _reload(self) -> None:
        if time.monotonic() - self._checked_at < RELOAD_EVERY_SECONDS:
            return
        self._checked_at = time.monotonic()
        stamp = self._stamp()
        if stamp is None or stamp == self._read_at:
            return
        try:
            self.tokens = parse_clients(self.path.read_text(), str(self.path))
            logger.info("jobs: read the clients' tokens again from %s (%d clients)", self.path, len(self.tokens))
        except (OSError, ValueError) as error:
            logger.error("jobs: keeping the clients read before: %s", error)
        self._read_at = stamp


class TorchServeCredentials:
    """The Authorization header for TorchServe: a fixed token from a file, or the inference key of TorchServe's
    key_file.json, read again whenever the file changes (a restarted TorchServe writes a new one) and renewed
    through the management API shortly before it expires."""

    def __init__(self, key_file: Path, token_file: Path | None, management_url: str, renew_before: float):
        self.key_file, self.token_file = key_file, token_file
        self.management_url, self.renew_before = management_url.rstrip("/"), renew_before
        self._read_at: tuple[float, int] | None = None
        self._entries: dict = {}

    async def header(self, session: aiohttp.ClientSession, kind: str = "inference") -> dict[str, str]:
        """For the inference API, or with kind "management" for the model's description (the auth proxy's
        token serves both)."""
        if self.token_file is not None:
            return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        self._reload()
        if not self._entries:
            return {}  # no key file yet: TorchServe will answer that a token is needed
        if self._expires_in(kind) < self.renew_before:
            await self._renew(session, kind)
        return {"Authorization": f"Bearer {self._entries[kind]['key']}"}

    def _reload(self) -> None:
        try:
            stat = self.key_file.stat()
            if self._read_at != (stat.st_mtime, stat.st_size):
                self._entries, self._read_at = json.loads(self.key_file.read_text()), (stat.st_mtime, stat.st_size)
        except (OSError, ValueError):  # not written yet, or being written: keep what was read before
            pass

    def _expires_in(self, kind: str) -> float:
        try:
            expiry = datetime.fromisoformat(self._entries[kind]["expiration time"])
        except (KeyError, TypeError, ValueError):
            return float("inf")
        return expiry.timestamp() - time.time()  # a naive time is local, as TorchServe writes it

    async def _renew(self, session: aiohttp.ClientSession, kind: str) -> None:
        """TorchServe's token API writes the renewed key into its key file, which the next call reads."""
        api_key = self._entries.get("API", {}).get("key")
        try:
            async with session.post(f"{self.management_url}/token", params={"type": kind},
                                    headers={"Authorization": f"Bearer {api_key}"},
                                    timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    logger.warning("jobs: renewing TorchServe's %s key failed: %s", kind, response.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.warning("jobs: renewing TorchServe's %s key failed: %s", kind, error)
        self._read_at = None
        self._reload()
