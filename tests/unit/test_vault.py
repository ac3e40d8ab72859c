from __future__ import annotations

import base64
import os

import pytest
from pydantic import SecretStr

from shared.vault import Vault, VaultError, new_master_key, parse_key


def _key() -> bytes:
    return os.urandom(32)


def test_round_trip_and_owner_binding() -> None:
    vault = Vault("k1", {"k1": _key()})
    blob = vault.seal_secrets({"password": SecretStr("s3cret")}, "syspro-main")
    assert b"s3cret" not in blob
    assert vault.open_secrets(blob, "syspro-main")["password"].get_secret_value() == "s3cret"
    with pytest.raises(VaultError, match="failed authentication"):
        vault.open_secrets(blob, "other-connection")


def test_tampered_ciphertext_is_detected() -> None:
    vault = Vault("k1", {"k1": _key()})
    blob = bytearray(vault.encrypt(b"hello", "c"))
    blob[-1] ^= 0x01
    with pytest.raises(VaultError, match="tampered"):
        vault.decrypt(bytes(blob), "c")


def test_wrong_key_and_unknown_key_id() -> None:
    blob = Vault("k1", {"k1": _key()}).encrypt(b"hello", "c")
    with pytest.raises(VaultError, match="master key is wrong"):
        Vault("k1", {"k1": _key()}).decrypt(blob, "c")
    with pytest.raises(VaultError, match="not configured"):
        Vault("k2", {"k2": _key()}).decrypt(blob, "c")


def test_error_messages_never_carry_secret_material() -> None:
    vault = Vault("k1", {"k1": _key()})
    blob = vault.seal_secrets({"token": SecretStr("tok-123")}, "c")
    try:
        Vault("k1", {"k1": _key()}).open_secrets(blob, "c")
    except VaultError as exc:
        assert "tok-123" not in str(exc)


def test_parse_key_errors() -> None:
    assert len(parse_key(new_master_key())) == 32
    with pytest.raises(VaultError, match="base64"):
        parse_key("not base64 !!")
    with pytest.raises(VaultError, match="32 bytes"):
        parse_key(base64.b64encode(b"short").decode())
