"""Azure Key Vault secrets through azure-keyvault-secrets, authenticated by
azure-identity's default credential chain (environment, workload identity,
managed identity, ...) (``pip install 'sidekey[azure]'``).

``azure-kv:NAME`` is the latest version of the secret, ``azure-kv:NAME/VERSION``
a pinned one. The Azure SDK logs request and response details at DEBUG;
``proxy.credentials.registry.quiet_sdk_loggers`` keeps its loggers at INFO.
"""

from __future__ import annotations

import contextlib
from typing import Any

from proxy.credentials.model import Credential, SourceError
from proxy.credentials.sdk_client import SdkClient
from proxy.policy import SecretRef
from proxy.policy.credential_model import AzureKvStore


class AzureKvClient(SdkClient[AzureKvStore]):
    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        try:
            from azure.identity.aio import DefaultAzureCredential
            from azure.keyvault.secrets.aio import SecretClient
        except ImportError:
            raise SourceError("azure-kv: needs the azure extra (pip install 'sidekey[azure]')") from None
        verify: Any = self.store.ca_bundle if self.store.ca_bundle is not None else True
        credential = await stack.enter_async_context(DefaultAzureCredential(connection_verify=verify))
        return await stack.enter_async_context(SecretClient(self.store.vault_url, credential, connection_verify=verify))

    async def read(self, ref: str) -> Credential:
        from azure.core.exceptions import AzureError, HttpResponseError

        name, _, version = ref.partition("/")
        client = await self._get()
        try:
            secret = await client.get_secret(name, version or None)
        except HttpResponseError as exc:  # the status only: the SDK's message may quote the answer
            raise SourceError(f"azure-kv read failed (HTTP {exc.status_code})") from None
        except AzureError as exc:
            raise SourceError(f"azure-kv read failed ({type(exc).__name__})") from None
        value = secret.value
        if not isinstance(value, str):
            raise SourceError("azure-kv secret has no value")
        expires = secret.properties.expires_on
        return Credential(value, expires.timestamp() if expires is not None else None)


class AzureKvSource:
    def __init__(self, client: AzureKvClient, ref: SecretRef) -> None:
        self.client, self.ref, self.source = client, ref, ref.source

    async def fetch(self) -> Credential:
        return await self.client.read(self.ref.ref)
