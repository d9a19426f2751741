"""The token request an OAuth2 credential sends (RFC 6749 2.3.1, 4.4.2, 6): a table."""

from __future__ import annotations

import base64

import pytest

from proxy.credentials.oauth2 import token_request
from proxy.policy import SecretRef
from proxy.policy.credential_model import OAuth2

SECRET = SecretRef("env", "CLIENT_SECRET")
URL = "https://auth.example.com/oauth2/token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("cfg", "secret", "refresh", "form", "authorization"),
    [
        (OAuth2(URL, "app", SECRET), "s3cret", None, {"grant_type": "client_credentials"}, basic("app", "s3cret")),
        # 2.3.1: id and secret are form-urlencoded before Basic
        (
            OAuth2(URL, "my app", SECRET),
            "a:b/c",
            None,
            {"grant_type": "client_credentials"},
            basic("my+app", "a%3Ab%2Fc"),
        ),
        (
            OAuth2(URL, "app", SECRET, scope="read write", audience="https://api.example.com", auth_method="post"),
            "s3cret",
            None,
            {
                "grant_type": "client_credentials",
                "scope": "read write",
                "audience": "https://api.example.com",
                "client_id": "app",
                "client_secret": "s3cret",
            },
            None,
        ),
        (
            OAuth2(URL, "app", SECRET, grant="refresh_token", refresh_token=SecretRef("env", "RT")),
            "s3cret",
            "rt-1",
            {"grant_type": "refresh_token", "refresh_token": "rt-1"},
            basic("app", "s3cret"),
        ),
        # a public client (no secret) names itself in the form
        (
            OAuth2(URL, "cli", None, grant="refresh_token", refresh_token=SecretRef("env", "RT")),
            None,
            "rt-1",
            {"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": "cli"},
            None,
        ),
    ],
)
def test_token_request(
    cfg: OAuth2, secret: str | None, refresh: str | None, form: dict[str, str], authorization: str | None
) -> None:
    got_form, headers = token_request(cfg, secret, refresh)
    assert got_form == form
    assert headers.get("Authorization") == authorization
    assert headers["Accept"] == "application/json"
