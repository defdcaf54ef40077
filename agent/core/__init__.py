"""The daemon core every part shares: the node snapshot and its typed keys (`snapshot`)
and the one backoff rule (`backoff`). It imports nothing else of ours."""
