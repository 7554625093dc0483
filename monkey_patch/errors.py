"""The error every patch raises for a setup it cannot run (a flag, a device, a model): its message says what to do."""


class PatchError(ValueError):
    """An unsupported patch setup; train.py prints the message and exits with status 2."""
