"""Process settings: a bad value stops the program with one line naming the variable, and the
development master key is refused in production however it is written."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from shared.settings import DEV_MASTER_KEY, SettingsError, load_settings
from shared.vault import Vault, VaultError

OTHER_KEY = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("MLC_ENV", "MLC_MASTER_KEY", "MLC_MASTER_KEY_ID", "MLC_OLD_MASTER_KEYS"):
        monkeypatch.delenv(name, raising=False)
    load_settings.cache_clear()
    yield
    load_settings.cache_clear()


def _refused(capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ml-connector: ")
    for part in expected:
        assert part in err, err
    return err


@pytest.mark.parametrize(
    "spelling",
    [
        DEV_MASTER_KEY + " ",
        DEV_MASTER_KEY + "\n",
        " \t" + DEV_MASTER_KEY + "\r\n",
        DEV_MASTER_KEY[:-2] + "R=",  # another base64 spelling of the same 32 bytes
    ],
)
def test_production_refuses_the_development_key_however_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    monkeypatch.setenv("MLC_ENV", "production")
    monkeypatch.setenv("MLC_MASTER_KEY", spelling)
    _refused(capsys, "MLC_MASTER_KEY: the development key is refused in production")


def test_production_takes_a_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_ENV", "production")
    monkeypatch.setenv("MLC_MASTER_KEY", OTHER_KEY + "\n")
    assert load_settings().env == "production"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "must decode to 16, 24 or 32 bytes, not 0"),
        ("   ", "must decode to 16, 24 or 32 bytes, not 0"),
        ("not base64 at all!", "is not valid base64"),
        (base64.b64encode(b"short").decode(), "not 5"),
    ],
)
def test_an_empty_or_malformed_master_key_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv("MLC_MASTER_KEY", value)
    err = _refused(capsys, "setting MLC_MASTER_KEY is invalid", expected)
    assert "Value error" not in err
    if value.strip():
        assert value.strip() not in err  # the value itself is never shown


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MLC_OLD_MASTER_KEYS", "k0", "id:base64key"),
        ("MLC_OLD_MASTER_KEYS", "k0:nope!", "MLC_OLD_MASTER_KEYS (k0) is not valid base64"),
        ("MLC_OLD_MASTER_KEYS", f"k0:{OTHER_KEY},k0:{OTHER_KEY}", "twice"),
        ("MLC_MASTER_KEY_ID", "", "MLC_MASTER_KEY_ID"),
        ("MLC_MASTER_KEY_ID", "k" * 300, "MLC_MASTER_KEY_ID"),
        ("MLC_MASTER_KEY_ID", "a:b", "MLC_MASTER_KEY_ID"),
    ],
)
def test_malformed_key_ids_and_old_keys_are_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(name, value)
    err = _refused(capsys, expected)
    assert OTHER_KEY not in err


def test_a_new_key_under_the_old_key_id_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rotating means a new id for the new key: the old key kept under the same id would be
    shadowed, and every secret sealed under it unreadable."""
    monkeypatch.setenv("MLC_MASTER_KEY", OTHER_KEY)
    monkeypatch.setenv("MLC_OLD_MASTER_KEYS", f"k1:{DEV_MASTER_KEY}")
    _refused(capsys, "a new master key needs a new MLC_MASTER_KEY_ID")
    monkeypatch.setenv("MLC_MASTER_KEY_ID", "k2")
    load_settings.cache_clear()
    settings = load_settings()
    vault = Vault.from_settings(settings)
    assert vault.current_key_id == "k2"


def test_the_vault_refuses_a_shadowed_old_key_too() -> None:
    # settings built without validation (model_construct, a script)
    loose = SimpleNamespace(
        master_key_id="k1",
        master_key=SecretStr(OTHER_KEY),
        old_master_keys=SecretStr(f"k1:{DEV_MASTER_KEY}"),
    )
    with pytest.raises(VaultError, match="needs a new MLC_MASTER_KEY_ID"):
        Vault.from_settings(loose)
