"""What a request may ask of this server, checked in one place before any model runs."""

import base64
import binascii
import hashlib
import io
import re
import warnings
from typing import Any

from PIL import Image

from actors.families import Multiples, family_of, latent_space
from cluster.storage import Storage, local_path
from schemas.api import GenerateRequest, VideoRequest
from schemas.config import ConfigError, ModelRef, ServeConfig, ServedModel


class InvalidInput(ValueError):
    """A request field this server cannot serve; the ingress answers 422 naming ``field``."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.value = value
        self.message = message


# An input image's largest side: larger ones are refused before they are decoded (Pillow's
# decompression-bomb guard is for ~89 M pixels; this is 16.8 M).
MAX_IMAGE_SIDE = 4096
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)


def video_image(request: VideoRequest, takes_image: bool, model: str) -> Image.Image | None:
    """The request's input image as RGB, None for a text-to-video model. Raises
    ``InvalidInput`` (a 422 naming ``image``) when the image is missing for an
    image-to-video model, given to a text-to-video one, or not a PNG, JPEG or WebP in
    base64. ``model``: the video model's pipeline class, for the messages."""
    if not takes_image:
        if request.image is not None:
            raise InvalidInput(
                "image", "...", f"the video model ({model}) makes videos from text alone; omit it"
            )
        return None
    if request.image is None:
        raise InvalidInput(
            "image", None, f"the video model ({model}) animates an image: send one (base64)"
        )
    shown = request.image[:32] + ("..." if len(request.image) > 32 else "")
    try:
        data = base64.b64decode(_DATA_URL.sub("", request.image.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image", shown, "not base64 (or a data: URL of base64)") from None
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning as an error: refused below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as err:
        raise InvalidInput("image", shown, f"not a readable image ({err})") from None
    if image.format not in _IMAGE_FORMATS:
        raise InvalidInput("image", shown, f"a {image.format} image; send a PNG, JPEG or WebP")
    if max(image.size) > MAX_IMAGE_SIDE:
        message = f"{image.width}x{image.height}: sides must be at most {MAX_IMAGE_SIDE}"
        raise InvalidInput("image", shown, message)
    try:
        return image.convert("RGB")  # decodes it all: a truncated file fails here
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput("image", shown, f"not a readable image ({err})") from None


def check_inputs(
    request: GenerateRequest | VideoRequest, config: ServeConfig, multiples: Multiples
) -> None:
    """The checks that depend on this server (its sizes, stages, models and limits); the
    request's own field ranges are its schema's. ``multiples``: what the requested model's
    bundle family fixes about shapes, asked once of the stage that holds it. Raises
    ``InvalidInput``."""
    if isinstance(request, VideoRequest):
        video = config.video
        assert video is not None and multiples.frames is not None
        _check_sides(request, multiples.size, video.max_height, video.max_width)
        if (request.num_frames - 1) % multiples.frames:
            raise InvalidInput(
                "num_frames",
                request.num_frames,
                f"num_frames - 1 must be a multiple of {multiples.frames} (the VAE's "
                "temporal downscale)",
            )
        if request.num_frames > video.max_num_frames:
            raise InvalidInput(
                "num_frames", request.num_frames, f"must be at most {video.max_num_frames}"
            )
        return
    model = served_model(request, config)
    _check_sides(request, multiples.size, config.max_height, config.max_width)
    if request.num_images_per_prompt > config.max_images_per_request:
        raise InvalidInput(
            "num_images_per_prompt",
            request.num_images_per_prompt,
            f"at most {config.max_images_per_request} images per request",
        )
    if request.refiner and model.refiner is None:
        raise InvalidInput(
            "refiner", request.refiner, f"model {model.name!r} has no refiner stage here"
        )
    if request.upscale > len(config.super_resolution):
        raise InvalidInput(
            "upscale",
            request.upscale,
            f"this server has {len(config.super_resolution)} super-resolution stages",
        )
    if request.loras and config.loras is None:
        raise InvalidInput(
            "loras", _names(request), "this server serves no adapters (config: loras)"
        )
    if request.loras and model.name != config.model_name:
        raise InvalidInput(
            "loras",
            _names(request),
            f"adapters are served for the main model {config.model_name!r}, not {model.name!r}",
        )
    if config.loras is not None and len(request.loras) > config.loras.max_per_request:
        raise InvalidInput(
            "loras", _names(request), f"at most {config.loras.max_per_request} adapters per request"
        )
    if request.timeout_s is not None and request.timeout_s > config.request_timeout_s:
        raise InvalidInput(
            "timeout_s", request.timeout_s, f"must be at most {config.request_timeout_s:g}"
        )


def served_model(request: GenerateRequest, config: ServeConfig) -> ServedModel:
    """The served model the request's ``model`` names (none: the main one); ``InvalidInput``
    naming the served ones for another name."""
    model = config.served_model(request.model)
    if model is None:
        names = ", ".join(repr(served.name) for served in config.served_models)
        raise InvalidInput("model", request.model, f"unknown model; this server serves {names}")
    return model


def same_text_encoders(a: ModelRef, b: ModelRef, storage: Storage) -> bool:
    """Whether two bundles encode prompts alike: the same family, and byte-identical text
    encoder and tokenizer files (compared by size, then by S3 ETag or a local SHA-256)."""
    families = [family_of(ref.uri, storage, media="image") for ref in (a, b)]
    if families[0] is not families[1]:
        return False
    family = families[0]
    listings = [_listing(ref, family, storage) for ref in (a, b)]
    sizes = [[(path, info.size) for path, info in listing] for listing in listings]
    # By size first: files of other sizes are not read.
    return sizes[0] == sizes[1] and _contents(listings[0]) == _contents(listings[1])


def _listing(ref: ModelRef, family: Any, storage: Storage) -> list[tuple[str, Any]]:
    """(path inside the bundle, object info) of each text-encoder and tokenizer file."""
    uri = ref.uri
    return [
        (info.uri[len(uri) :], info)
        for component in (*family.text_encoders, *family.tokenizers)
        for info in storage.list_info(Storage.join(uri, component))
    ]


def _contents(listing: list[tuple[str, Any]]) -> list[str]:
    """A content hash per listed file: its S3 ETag, or a local file's SHA-256."""
    hashes = []
    for _, info in listing:
        if info.etag is not None:
            hashes.append(info.etag)
        else:
            with open(local_path(info.uri), "rb") as file:
                hashes.append(hashlib.file_digest(file, "sha256").hexdigest())
    return hashes


def check_refiner(base: ModelRef, refiner: ModelRef, storage: Storage, field: str) -> None:
    """A refiner continues its base's latents: the same family, latent channels, VAE downscale
    and latent factors, or a ``ConfigError`` naming ``field`` and both bundles (their configs
    are read; no weights)."""
    spaces = [latent_space(ref.uri, storage) for ref in (base, refiner)]
    if spaces[0] != spaces[1]:
        described = [", ".join(f"{key} {value}" for key, value in s.items()) for s in spaces]
        raise ConfigError(
            f"{field}: {refiner.uri} ({described[1]}) does not share the latent space of its "
            f"base {base.uri} ({described[0]}); a refiner continues the base's latents"
        )


def _names(request: GenerateRequest) -> list[str]:
    return [lora.name for lora in request.loras]


def _check_sides(
    request: GenerateRequest | VideoRequest, multiple: int, max_height: int, max_width: int
) -> None:
    for field, value, maximum in (
        ("height", request.height, max_height),
        ("width", request.width, max_width),
    ):
        if value < multiple or value % multiple:
            raise InvalidInput(
                field, value, f"must be a multiple of {multiple} (VAE downscale x patch size)"
            )
        if value > maximum:
            raise InvalidInput(field, value, f"must be at most {maximum}")
