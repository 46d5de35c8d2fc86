"""chefia-rt: the real-time synchronization server of the Chefia restaurant POS."""

__version__ = "0.1.0"
