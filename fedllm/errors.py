"""Named exceptions whose one-sentence messages are shown to users without a traceback."""

from __future__ import annotations

__all__ = [
    "BenchmarksNotFoundError",
    "BudgetExceededError",
    "ConfigError",
    "DataError",
    "DiskError",
    "FedllmError",
    "InvalidUpdateError",
    "KeyFileError",
    "ModelError",
    "PolicyRefusedError",
    "ProtectionUnavailableError",
    "RunDirError",
    "TransportError",
    "UNREADABLE_REPLY",
]


class FedllmError(Exception):
    """Base class: its message is one sentence saying what is wrong and how to fix it."""


class ConfigError(FedllmError):
    """A configuration key is unknown, mistyped or has a value out of range."""


class DataError(FedllmError):
    """Input data is missing, empty or malformed."""


class DiskError(FedllmError):
    """The run's folder cannot be written: not writable, too little free space, or a write
    that failed (`fedllm.disk`)."""


class ModelError(FedllmError):
    """A base model or adapter cannot be loaded or does not fit the configuration."""


class InvalidUpdateError(FedllmError):
    """An incoming update has wrong names, shapes, dtypes or non-finite values."""


class KeyFileError(FedllmError):
    """A key or context file is missing, unreadable, too open, or holds the wrong kind of key."""


class ProtectionUnavailableError(FedllmError):
    """A requested privacy or security protection cannot be applied (never silently skipped)."""


class BudgetExceededError(FedllmError):
    """Training another round would exceed a site's privacy budget."""


class PolicyRefusedError(FedllmError):
    """A request would lower a site's protection below its own policy (`fedllm.site_policy`)."""


class RunDirError(FedllmError):
    """A run directory is missing, incomplete or belongs to a different configuration."""


class TransportError(FedllmError):
    """A SuperLink address does not answer, or its TLS certificate is refused."""


class BenchmarksNotFoundError(FedllmError):
    """`fedllm bench` was run outside a fedllm checkout (benchmarks/ is not installed)."""


# What reading a site's reply may raise when it is malformed (a missing record or metric, a
# value of the wrong type, bytes that are no array) besides the designed InvalidUpdateError:
# every coordinator stage that reads a reply rejects it, naming the site, on any of these.
UNREADABLE_REPLY = (InvalidUpdateError, KeyError, ValueError, TypeError)
