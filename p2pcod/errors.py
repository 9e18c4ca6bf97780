"""Typed errors of the library. Only cli.py prints them and picks exit codes."""


class P2pcodError(Exception):
    """Base class of every error p2pcod raises on purpose."""


class CodecError(P2pcodError):
    """A checkpoint blob could not be encoded or is not a valid, safe checkpoint."""


class ConfigError(P2pcodError):
    """A recipe, experiment spec or flag is invalid; the message names the key."""


class DataError(P2pcodError):
    """Training or validation data is missing or malformed."""


class SwarmError(P2pcodError):
    """Membership or transfer failed (network, peer record, remote peer)."""


class RecordError(SwarmError):
    """A peer record from the DHT does not match the schema."""


class CheckpointError(P2pcodError):
    """A local checkpoint is missing or unreadable."""
