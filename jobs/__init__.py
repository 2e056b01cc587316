"""The jobs service (docs/jobs.md): submit, watch, fetch and cancel style transfers that outlive any
connection, for many clients. An aiohttp API and an arq worker in one process, the jobs' records in Redis and
their images in an object store, the work done by TorchServe through its normal streaming inference API. Run it
with `python -m jobs` (settings: jobs/config.py)."""
