"""The one base of every error that is the user's to fix."""


class RaygenError(ValueError):
    """Bad input from the user (a config, a URI, a bundle, credentials).

    The message names what is wrong and where; the CLI prints it as one line instead of a
    traceback. Bugs in raygen stay ordinary exceptions with tracebacks.
    """


class AdapterError(RaygenError):
    """An adapter a request named cannot be used: not in the registry (HTTP 404), or not one
    the served base can load (422). The message names the adapter; it crosses Ray's process
    boundaries whole (a replica raises it, the ingress answers with it)."""

    def __init__(self, name: str, reason: str, status: int = 422) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason
        self.status = status

    def __reduce__(self) -> tuple[type, tuple[str, str, int]]:
        return AdapterError, (self.name, self.reason, self.status)
