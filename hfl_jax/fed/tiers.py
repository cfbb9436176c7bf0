"""Names of the per-tier cost fields of a round (pure constants, no imports).

:func:`hfl_jax.fed.cost.group_cost` returns these keys for a group; the algorithms' stages
(:mod:`hfl_jax.algos.stages`) sum them into a round record, and the run reports
(:mod:`hfl_jax.report`, which re-exports both names) total them over rounds.
"""

#: Bytes per link tier: device <-> edge server and edge server (or device, flat algorithms) <-> cloud.
TIER_BYTES = ("edge_bytes_up", "edge_bytes_down", "cloud_bytes_up", "cloud_bytes_down")
#: The simulated critical path split into compute, device-edge and cloud seconds.
TIER_TIMES = ("time_compute", "time_edge", "time_cloud")
