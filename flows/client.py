"""The HTTP client of `raygen serve`, for `raygen generate`: standard library only, so the
client side needs neither Ray nor torch."""

import base64
import json
import os
import urllib.error
import urllib.request

from schemas.api import GenerateRequest, GenerateResponse


def generate_image(
    url: str,
    request: GenerateRequest,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> GenerateResponse:
    """Call a running server's ``POST /v1/generate``."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    call = urllib.request.Request(
        f"{url.rstrip('/')}/v1/generate",
        data=request.model_dump_json(exclude_none=True).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as response:
            return GenerateResponse.model_validate_json(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.dumps(json.loads(detail)["detail"])
        except (ValueError, KeyError, TypeError):
            pass
        raise ServerError(err.code, detail) from None
    except urllib.error.URLError as err:
        raise ConnectionError(f"cannot reach raygen server at {url}: {err.reason}") from None


class ServerError(ValueError):
    """The server refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"server answered {status}: {detail}")
        self.status = status


def write_images(response: GenerateResponse, out: str) -> list[str]:
    """Write the response's images: ``out`` for one, ``stem-<i>.suffix`` for several."""
    root, suffix = os.path.splitext(out)
    paths = []
    for index, image in enumerate(response.images):
        if image.b64_json is None:
            raise ValueError("expected inline images (response_format b64_json)")
        path = out if len(response.images) == 1 else f"{root}-{index}{suffix or '.png'}"
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(image.b64_json))
        paths.append(path)
    return paths
