"""The jobs service (CONTRACT.md "jobs"): submit, watch, fetch and cancel style transfers that outlive any
connection. An aiohttp API and an arq worker in one process, all state in Redis, the work done by TorchServe
through its normal streaming inference API. Run it with `python -m jobs` (settings: jobs/config.py)."""
