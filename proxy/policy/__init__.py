"""The policy: its model (``model``, with ``rates``), how it is read (``load``, ``fields``,
``groups``, ``quotas``, ``websocket``), compared (``diff``) and watched for changes (``watch``).

``from proxy.policy import Policy``: the model's public names are re-exported here (all
of them, so a name added to the model needs no second edit); the loader is not (import
``proxy.policy.load``), so reading the model never pulls in YAML parsing.
"""

from proxy.policy.model import *  # noqa: F403 - the package's face is the model
from proxy.policy.rates import Price as Price
from proxy.policy.rates import Rule as Rule
