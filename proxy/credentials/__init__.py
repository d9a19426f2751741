"""Credentials: one model for every place a secret comes from.

A *source* (``proxy.credentials.model.Source``) fetches a ``Credential``: a
value and, when it has one, an expiry. Static sources (``env:``, ``file:``)
are read by ``proxy.secrets.SecretStore`` off the loop and looked up in a
dict on the request path, as before: they pay nothing for the machinery
here. Dynamic sources (``vault:``, ``aws-sm:``, ``azure-kv:``, OAuth2 token
endpoints) are each held by a ``CachedCredential``: re-read every ``ttl``
in the background, a last good value served for ``stale_for`` while the
store is unreachable, one fetch in flight per secret, then fail closed.

The decisions (when to refresh, whether a value may still be served, how
long to back off) are pure functions in ``model``; ``cache`` does the
waiting; ``registry.CredentialSet`` is what the injector asks.
"""
