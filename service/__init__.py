"""The aiohttp HTTP service: health, readiness, status, metrics and admin endpoints."""
