"""The client every credential source uses, against a real TLS server:
verification is always on (a store whose certificate the named CA did not
sign is refused, and the error names TLS, not the body), the metadata guard
applies to store and token addresses, and a Vault login is reused."""

from __future__ import annotations

import pytest
import trustme

from proxy.credentials.http import StoreClient
from proxy.credentials.model import SourceError
from proxy.credentials.vault import VaultClient
from proxy.netguard import Guard
from proxy.policy.credential_model import StaticRef, VaultAuth, VaultStore
from tests.fakes.stores import FakeVault


@pytest.mark.asyncio
async def test_tls_verified_guarded_and_login_reused(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeVault() as vault:
        vault.put("secret", "x", {"k": "v-SECRET"})
        vault.approles["r"] = "sid-SECRET"
        monkeypatch.setenv("SID", "sid-SECRET")
        auth = VaultAuth("approle", role_id="r", secret_id=StaticRef("env", "SID"), mount="approle")
        client = VaultClient(VaultStore(vault.url, auth, ca_bundle=str(vault.ca_pem_path)), Guard(()))
        try:
            assert (await client.read("secret/data/x", "k")).value == "v-SECRET"
            assert (await client.read("secret/data/x", "k")).value == "v-SECRET"
            assert vault.logins == 1 and vault.reads == 2
            vault.tokens.clear()  # the login's token revoked: one new login, then the read
            assert (await client.read("secret/data/x", "k")).value == "v-SECRET" and vault.logins == 2
        finally:
            await client.close()

        other = tmp_path / "other-ca.pem"  # type: ignore[operator]
        trustme.CA().cert_pem.write_to_path(str(other))
        wrong = VaultClient(VaultStore(vault.url, auth, ca_bundle=str(other)), Guard(()))
        try:
            with pytest.raises(SourceError, match="TLS to localhost failed verification") as info:
                await wrong.read("secret/data/x", "k")
            assert "SECRET" not in str(info.value)
        finally:
            await wrong.close()

    guarded = StoreClient(None, Guard(()))
    try:
        with pytest.raises(SourceError, match="169.254.169.254 is a blocked address"):
            await guarded.request("POST", "https://169.254.169.254/token")
        with pytest.raises(SourceError, match="blocked address"):
            await guarded.request("GET", "https://[fd00:ec2::254]/latest")
    finally:
        await guarded.close()
