"""Settings for every tier.

Hypothesis's per-example deadline (200 ms by default) measures wall time, which on
a loaded machine (load average 20-50 on 2 cores) says how long the process waited
for a core, not how slow the code is: an example that took 14 ms alone took 461 ms
under load and failed as "unreliable timings". The deadline is off for every test;
pytest-timeout (pyproject.toml) still bounds each test as a whole.
"""

from hypothesis import settings

settings.register_profile("sidekey", deadline=None)
settings.load_profile("sidekey")
