"""Prefect flows: thin orchestration around ``medml`` library calls."""

import os

# Set before Prefect is imported anywhere: no analytics, and medml's own log records
# appear in the Prefect run logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "medml")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
