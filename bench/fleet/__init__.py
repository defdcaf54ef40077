"""Trace-driven simulation of a fleet of vLLM nodes under the MIG autoscaler and the
HPA (bench/fleet_sim.py runs it; bench/FLEET.md has the method and the results).

trace.py: arrival traces (CSV) and the sample ones; node_model.py: one node's vLLM
as a fluid serving model that serves vLLM's own metrics; agent_view.py: the agent's
real derivation and demand code on those metrics; autoscalers.py: the MIG autoscaler
and the HPA; sim.py: the fleet, its lifecycle and the accounting; report.py: the
table and the plot.
"""
