"""The node's lifecycle: states, the transition table, its history and the persisted admin drain."""

from state_machine.lifecycle import Drain, Lifecycle, ResumeRefused, Transition
from state_machine.states import DrainReason, Source, State

__all__ = ["Drain", "DrainReason", "Lifecycle", "ResumeRefused", "Source", "State", "Transition"]
