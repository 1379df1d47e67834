"""The one exception batchlab raises for bad user input.

Constructors and commands raise ``ConfigError`` with a message that names the bad value and what is allowed;
``batchlab.cli.main`` prints it as a single line and exits with status 2, without a traceback. It subclasses
``ValueError`` so that code using batchlab as a library can catch it the usual way.
"""


class ConfigError(ValueError):
    """A user-given value is out of range, of the wrong shape or otherwise unusable."""


def check(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
