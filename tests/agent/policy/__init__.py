"""Tests of agent/policy/: the decisions, on real lifecycles and snapshots."""
