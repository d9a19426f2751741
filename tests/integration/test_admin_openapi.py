"""The admin API against its OpenAPI document (docs/admin-openapi.yaml), with
schemathesis generating requests for every documented operation and checking
status codes, content types and response schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import SECRET_ENV, SECRETS, fake_provider, policy_for
from tests.integration.sidekey_process import REPO, SidekeyProcess

schema = schemathesis.openapi.from_path(REPO / "docs" / "admin-openapi.yaml")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidekeyProcess]:
    with FakeProviderThread() as fake:
        workdir: Path = tmp_path_factory.mktemp("admin-openapi")
        cached = fake_provider(fake, "cached", "cached.test", cache="{ttl: 1m}")  # /cache/stats has a row
        proxy = SidekeyProcess(workdir, policy_for(fake, extra=cached), env=SECRET_ENV).start()
        try:
            yield proxy
        finally:
            proxy.stop()
        assert not any(secret in proxy.log() for secret in SECRETS)


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any], running: SidekeyProcess) -> None:
    response = case.call_and_validate(base_url=running.admin_url)
    assert not any(secret in response.text for secret in SECRETS)


def test_every_route_is_documented() -> None:
    import yaml

    from proxy.admin import ROUTES

    paths = yaml.safe_load((REPO / "docs" / "admin-openapi.yaml").read_text())["paths"]
    documented = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    assert {(method, path) for method, path, _handler in ROUTES} == documented
