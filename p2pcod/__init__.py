"""p2pcod: peer-to-peer codistillation."""

__version__ = "0.1.0"
