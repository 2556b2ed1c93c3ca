"""The package's single exception root.

Each layer derives its own base from it (``WireError``, ``GuestMemoryError``,
``QueueError``, ``DeviceError``, ``DispatchError``), so a caller can catch one
layer's failures without catching bugs (plain ``Exception``).
"""


class PyVhostUserError(Exception):
    """Base of every error this package raises on purpose."""
