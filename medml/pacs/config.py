"""PACS credentials, from the environment only; the ``pacs:`` settings section itself is
:class:`medml.config.PacsConfig` (re-exported here).

Credentials are never settings: they come from ``MEDML_PACS_USERNAME`` and
``MEDML_PACS_PASSWORD``, or ``MEDML_PACS_TOKEN`` for a bearer token, so they reach neither the
config files nor MLflow, where the settings are logged as parameters.
"""

from __future__ import annotations

import os

from medml.config import PacsConfig

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "USERNAME_ENV", "PacsConfig", "credentials", "token"]

USERNAME_ENV = "MEDML_PACS_USERNAME"
PASSWORD_ENV = "MEDML_PACS_PASSWORD"
TOKEN_ENV = "MEDML_PACS_TOKEN"


def credentials() -> tuple[str, str] | None:
    """``(username, password)`` from the environment, or None."""
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    return (user, password or "") if user else None


def token() -> str | None:
    """A bearer token from the environment, or None."""
    return os.environ.get(TOKEN_ENV) or None
