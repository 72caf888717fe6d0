"""Per-node services a starting replica finds by name: the weight store and the standby pool."""
