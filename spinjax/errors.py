"""Errors that mean "bad input": the CLI turns them into exit code 2 with their message."""


class InputError(Exception):
    """Bad input from the user: a file, tensor, argument or store. The message says what and where."""


class UnsafeCheckpointError(InputError):
    """A pickled checkpoint asks for something other than tensor reconstruction."""
