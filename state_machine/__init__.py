"""The node's lifecycle, pure: states, the transition table, its history, and the record of a
persisted drain (saved_drain; the file that holds it is agent/state_file.py). Imports nothing of ours."""

from state_machine.lifecycle import Drain, Lifecycle, ResumeRefused, Transition
from state_machine.states import DrainReason, Source, State

__all__ = ["Drain", "DrainReason", "Lifecycle", "ResumeRefused", "Source", "State", "Transition"]
