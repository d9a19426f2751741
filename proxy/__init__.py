"""sidekey's engine: a localhost forward proxy that holds the credentials.

Theory of operation
-------------------
1. Listener (``server.Sidekey``): asyncio server on 127.0.0.1:8080. The first
   request head on a connection decides its kind:
   - ``CONNECT host:port`` for a host a policy matches: answer 200, terminate
     the client's TLS with a leaf certificate for ``host`` minted from our CA
     (``leaf_contexts.LeafContexts``), then serve HTTP/1.1 on the decrypted stream.
     The CONNECT target is the only authority for everything inside.
   - ``CONNECT`` for an unmatched host: a blind byte tunnel, or 403 (policy
     ``unmatched``); metadata addresses and sidekey's own ports refused
     (``netguard``).
   - absolute-form ``http://host/...``: a plain proxy request; for a matched
     host it is forwarded upstream over TLS.
   - anything else: 400.
2. HTTP/1.1 loop (``http_session``, given the narrow ``conn.Engine`` view, never
   the engine itself): read a head (``http1``, pure rules), build a
   ``flow.Flow`` carrying the policy snapshot, run the ``request`` hooks of
   the addons (``hooks.AddonManager``; a ``request`` hook may answer locally),
   forward, run ``responseheaders``, stream the body back chunk by chunk, then
   ``response`` (or ``error``).
3. Attempt loop (``attempt_loop``): the attempts of one request under one deadline.
   What to do next is decided by the sans-IO planner (``plan.Plan``: which
   member of the provider's group, via ``balance``; retry or wait, via
   ``retry.decide``; fail over, via ``failover.rewrite``; stop); the
   forwarder only carries out its verdicts, and sends the common request
   (one member, answered) without making a plan. Every attempt
   (``attempt.Attempt``) runs the addons' ``upstream_attempt`` hooks: that
   member's credential, the provider's headers, the key's own limits; so a
   retry or a fallback runs exactly what the first attempt ran. It then goes
   through ``upstream.UpstreamPools`` (one long-lived aiohttp ClientSession
   per upstream identity, TLS always verified, no redirects followed, no
   decompression; aiohttp errors mapped to ours in one place). The attempt
   holds its member's in-flight lease until its response is released.
4. Behaviour lives in addons (``addons/``; ``addons.default_addons`` lists
   them in order with the reason for each place): credentials, provider
   headers, usage and budgets (``addons/usage/``), the response cache
   (``addons/cache/``), limits (``addons/limits/``), metrics, health checks;
   audit and the dead-letter queue when asked for. Hooks are declared once,
   typed, in ``hooks``; an addon gets a ``runtime.Runtime``, not the engine,
   and offers typed ``capabilities`` (usage report, secrets) instead of
   attributes found by name.
5. The policy (``policy/``): frozen dataclasses (``policy.model``; limit
   rules, prices and token counts in ``policy.rates``) read once from YAML by
   ``policy.load`` with line-numbered errors that never quote a value. A
   changed file (``policy.watch``) is parsed and offered to every addon's
   ``configure`` first, then swapped in as one reference (``server.Sidekey.reload``);
   flows in flight keep the snapshot they started with.
6. Around it: the admin API (``admin``: health, metrics, providers, usage,
   policy and reload) on its own loopback listener; secrets read by one
   reader (``secrets``) or fetched from stores (``credentials/``); the Redis
   client shared by limits, usage and cache (``redis_client``).

Layering (``docs/architecture.md``; checked by ``lint-imports``): ``proxy``
never imports ``addons`` (the CLI, which assembles them, aside); no import
cycles among a package's modules; addons reach the engine only through the
runtime, the capabilities and the flow, policy and error types.
"""

__version__ = "0.1.0"
