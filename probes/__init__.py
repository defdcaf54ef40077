"""Every source of signals about the node: NVML, vLLM, host, GCE metadata."""
