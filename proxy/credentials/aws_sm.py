"""AWS Secrets Manager through aiobotocore (``pip install 'sidekey[aws]'``).

``aws-sm:NAME-OR-ARN`` is the secret's ``SecretString``; ``aws-sm:NAME#KEY``
the string under ``KEY`` when the secret is a JSON object. Credentials come
from botocore's standard chain (environment, profile, container or instance
role), region from ``secret_stores.aws_sm.region`` or that chain. One client
per store, opened on first use and closed at shutdown.

botocore logs request bodies and responses at DEBUG, secret values
included; ``proxy.credentials.registry.quiet_sdk_loggers`` keeps its loggers at INFO.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from proxy.credentials.model import Credential, SourceError, error_word
from proxy.credentials.sdk_client import SdkClient
from proxy.policy import SecretRef
from proxy.policy.credential_model import AwsSmStore


class AwsSmClient(SdkClient[AwsSmStore]):
    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        try:
            from aiobotocore.session import get_session
        except ImportError:
            raise SourceError("aws-sm: needs the aws extra (pip install 'sidekey[aws]')") from None
        from botocore.config import Config

        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=10)
        creator = get_session().create_client(
            "secretsmanager",
            region_name=self.store.region,
            endpoint_url=self.store.endpoint_url,
            verify=self.store.ca_bundle if self.store.ca_bundle is not None else True,
            config=config,
        )
        return await stack.enter_async_context(creator)

    async def read(self, secret_id: str, key: str) -> Credential:
        from botocore.exceptions import BotoCoreError, ClientError

        client = await self._get()
        try:
            resp = await client.get_secret_value(SecretId=secret_id)
        except ClientError as exc:  # the code only: botocore's message may quote the request
            code = error_word(exc.response.get("Error", {}).get("Code"), "error")
            raise SourceError(f"aws-sm read failed ({code})") from None
        except BotoCoreError as exc:
            raise SourceError(f"aws-sm read failed ({type(exc).__name__})") from None
        value = resp.get("SecretString")
        if not isinstance(value, str):
            raise SourceError("aws-sm secret has no SecretString (binary secrets are not supported)")
        if key:
            try:
                value = json.loads(value).get(key)
            except (ValueError, AttributeError):
                raise SourceError("aws-sm secret is not a JSON object") from None
            if not isinstance(value, str):
                raise SourceError("aws-sm secret has no such JSON key, or it is not a string")
        return Credential(value)


class AwsSmSource:
    def __init__(self, client: AwsSmClient, ref: SecretRef) -> None:
        self.client, self.ref, self.source = client, ref, ref.source

    async def fetch(self) -> Credential:
        return await self.client.read(self.ref.ref, self.ref.key)
