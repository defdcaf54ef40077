"""Tests of bench/: the fleet simulation."""
