"""The one base of every error that is the user's to fix."""


class RaygenError(ValueError):
    """Bad input from the user (a config, a URI, a bundle, credentials).

    The message names what is wrong and where; the CLI prints it as one line instead of a
    traceback. Bugs in raygen stay ordinary exceptions with tracebacks.
    """
