"""sidekey's engine: a localhost forward proxy that holds the credentials.

Theory of operation
-------------------
1. Listener (``engine.Sidekey``): asyncio server on 127.0.0.1:8080. The first
   request head on a connection decides its kind:
   - ``CONNECT host:port`` for a host a policy matches: answer 200, terminate
     the client's TLS with a leaf certificate for ``host`` minted from our CA
     (``certs.LeafContexts``), then serve HTTP/1.1 on the decrypted stream.
     The CONNECT target is the only authority for everything inside.
   - ``CONNECT`` for an unmatched host: a blind byte tunnel, or 403 (policy
     ``unmatched``); metadata addresses refused (``netguard``).
   - absolute-form ``http://host/...``: a plain proxy request; for a matched
     host it is forwarded upstream over TLS.
   - anything else: 400.
2. HTTP/1.1 loop (``exchange``): read a head (``http1``, pure rules), build a
   ``flow.Flow`` carrying the policy snapshot, run the addon hooks
   (``hooks.AddonManager``: ``request`` may rewrite or answer locally), send
   upstream, run ``responseheaders``, stream the body back chunk by chunk,
   then ``response`` (or ``error``).
3. Forwarder (``upstream``): one long-lived aiohttp ClientSession per
   upstream identity, TLS always verified, no redirects followed, no
   decompression; aiohttp errors mapped to ours in one place (``errors``).
4. Behaviour lives in addons (``addons/``): credential injection first.
"""

__version__ = "0.1.0"
