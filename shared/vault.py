"""Secrets at rest: AES-GCM under a master key from the environment.

A ciphertext is ``b"mlc1" | len(key_id) | key_id | nonce(12) | ciphertext+tag``; the associated
data binds it to its owner (the connection name), so a secret copied to another row fails to
decrypt. Rotation re-encrypts every stored secret under the current key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

MAGIC = b"mlc1"
# A key id is stored in one length byte beside every ciphertext, and listed as id:key in
# MLC_OLD_MASTER_KEYS.
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class VaultError(Exception):
    """A secret could not be decrypted or a key is unusable. Never carries secret material."""


def parse_key(text: str, name: str = "MLC_MASTER_KEY") -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"{name} is not valid base64") from None
    if len(key) not in (16, 24, 32):
        raise VaultError(f"{name} must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


def parse_old_keys(text: str) -> dict[str, bytes]:
    """``MLC_OLD_MASTER_KEYS``: ``id:base64key,...`` (empty: none)."""
    keys: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kid, sep, key = item.partition(":")
        kid = kid.strip()
        if not sep or not KEY_ID.match(kid):
            raise VaultError(
                "MLC_OLD_MASTER_KEYS takes id:base64key,... (ids of letters, digits, _ . -)"
            )
        if kid in keys:
            raise VaultError(f"MLC_OLD_MASTER_KEYS lists key id {kid!r} twice")
        keys[kid] = parse_key(key, f"MLC_OLD_MASTER_KEYS ({kid})")
    return keys


def new_master_key() -> str:
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class Vault:
    def __init__(self, current_key_id: str, keys: dict[str, bytes]) -> None:
        if current_key_id not in keys:
            raise VaultError(f"master key {current_key_id!r} is not among the configured keys")
        if any(not KEY_ID.match(kid) for kid in keys):
            raise VaultError("a key id is 1 to 64 letters, digits, _ . or -")
        self.current_key_id = current_key_id
        self._keys = {kid: AESGCM(key) for kid, key in keys.items()}

    @classmethod
    def from_settings(cls, settings: Any) -> Vault:
        current = parse_key(settings.master_key.get_secret_value())
        keys = parse_old_keys(settings.old_master_keys.get_secret_value())
        if keys.setdefault(settings.master_key_id, current) != current:
            raise VaultError(
                f"MLC_OLD_MASTER_KEYS holds another key under {settings.master_key_id!r}, the id"
                " of MLC_MASTER_KEY: a new master key needs a new MLC_MASTER_KEY_ID"
            )
        keys[settings.master_key_id] = current
        return cls(settings.master_key_id, keys)

    def encrypt(self, plaintext: bytes, owner: str) -> bytes:
        kid = self.current_key_id.encode()
        nonce = os.urandom(12)
        sealed = self._keys[self.current_key_id].encrypt(nonce, plaintext, owner.encode())
        return MAGIC + bytes([len(kid)]) + kid + nonce + sealed

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        if not blob.startswith(MAGIC) or len(blob) < 6:
            raise VaultError("not a vault ciphertext")
        length = blob[4]
        return blob[5 : 5 + length].decode()

    def decrypt(self, blob: bytes, owner: str) -> bytes:
        kid = self.key_id_of(blob)
        aead = self._keys.get(kid)
        if aead is None:
            raise VaultError(
                f"secret of {owner!r} was encrypted with master key {kid!r}, which is not"
                " configured (set MLC_OLD_MASTER_KEYS during a rotation)"
            )
        start = 5 + len(kid.encode())
        nonce, sealed = blob[start : start + 12], blob[start + 12 :]
        try:
            return aead.decrypt(nonce, sealed, owner.encode())
        except InvalidTag:
            raise VaultError(
                f"secret of {owner!r} failed authentication: it was tampered with, belongs to"
                " another owner, or the master key is wrong"
            ) from None

    def seal_secrets(self, secrets: dict[str, SecretStr], owner: str) -> bytes:
        plain = json.dumps({k: v.get_secret_value() for k, v in secrets.items()}).encode()
        return self.encrypt(plain, owner)

    def open_secrets(self, blob: bytes, owner: str) -> dict[str, SecretStr]:
        values = json.loads(self.decrypt(blob, owner))
        return {k: SecretStr(v) for k, v in values.items()}

    async def rotate(self, pool: asyncpg.Pool) -> dict[str, int]:
        """Re-encrypt every stored secret under the current key, in one transaction. Every
        secret is decrypted first, also those under the current key id: a master key changed
        without a new key id would otherwise be reported as rotated while nothing opens any
        more. On any failure nothing is written."""
        counts = {"connections": 0, "token_cache": 0, "webhook_channels": 0}
        tables = (
            ("connections", "name", "secrets", "name"),
            ("token_cache", "connection", "token", "connection"),
            ("webhook_channels", "channel_id", "token", "connection"),
        )
        async with pool.acquire() as conn, conn.transaction():
            for table, pk, column, owner_col in tables:
                rows = await conn.fetch(
                    f"SELECT {pk} AS pk, {column} AS blob, {owner_col} AS owner FROM {table}"
                    f" WHERE {column} IS NOT NULL FOR UPDATE"
                )
                for row in rows:
                    kid = self.key_id_of(row["blob"])
                    try:
                        plain = self.decrypt(row["blob"], row["owner"])
                    except VaultError as exc:
                        if kid != self.current_key_id:
                            raise VaultError(f"nothing rotated: {exc}") from None
                        raise VaultError(
                            f"nothing rotated: the secret of {row['owner']!r} ({table}) is under"
                            f" key id {kid!r} but does not open with MLC_MASTER_KEY: was the key"
                            " changed without a new MLC_MASTER_KEY_ID? Give the new key a new"
                            f" id and keep the old one as MLC_OLD_MASTER_KEYS={kid}:<old key>"
                        ) from None
                    if kid == self.current_key_id:
                        continue
                    blob = self.encrypt(plain, row["owner"])
                    await conn.execute(
                        f"UPDATE {table} SET {column} = $1, key_id = $2 WHERE {pk} = $3",
                        blob,
                        self.current_key_id,
                        row["pk"],
                    )
                    counts[table] += 1
        return counts
