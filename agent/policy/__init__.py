"""The node's decisions, apart from wiring and I/O: readiness (`readiness`),
preemption and maintenance notices (`preemption`), GPU faults (`gpu_faults`), the
idle watchdog (`idle`) and the drain itself (`drain`). Every source of a drain
emits one `DrainRequest`; `DrainDesk.request` (`requests`) is the one place that
starts one."""
