"""Simulators of vLLM, the GCE metadata server, Cloud Monitoring and NVML: the demo
runs on them and the tests use them as loopback fakes."""
