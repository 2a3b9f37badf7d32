"""HTTP API contracts. Field names follow diffusers' call arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 2000
# An input image's base64 text: 20 MiB of PNG or JPEG.
MAX_IMAGE_CHARS = 4 * (20 * 2**20) // 3 + 100
ResponseFormat = Literal["b64_json", "url"]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRef(ApiModel):
    """An adapter from the server's registry (``GET /v1/loras``) and its weight, as
    diffusers' ``set_adapters(names, adapter_weights)`` takes it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)


def _distinct_loras(loras: list[LoraRef]) -> list[LoraRef]:
    names = [lora.name for lora in loras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"adapter {repeated[0]!r} is named twice")
    return loras


LORAS_FIELD = Field(
    default_factory=list,
    description="adapters from GET /v1/loras, each with its scale (diffusers' set_adapters)",
)


class GenerateRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=28, ge=1, le=200)
    guidance_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    height: int = Field(default=1024, ge=8)
    width: int = Field(default=1024, ge=8)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="random when omitted")
    num_images_per_prompt: int = Field(default=1, ge=1, le=8)
    loras: list[LoraRef] = LORAS_FIELD
    refiner: bool = False
    denoising_end: float = Field(default=0.8, gt=0.0, lt=1.0, description="base/refiner handoff")
    upscale: int = Field(default=0, ge=0, description="super-resolution stages to run")
    response_format: ResponseFormat = "b64_json"
    model: str | None = Field(default=None, description="the served model's name, if given")
    timeout_s: float | None = Field(
        default=None, gt=0, description="at most the server's request_timeout_s"
    )
    stream: bool = Field(
        default=False,
        description=(
            "answer with server-sent events (text/event-stream): each stage's start and "
            "finish, each denoising step, then the response as a 'result' event (or an "
            "'error' event with its status and detail)"
        ),
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value

    _loras_distinct = field_validator("loras")(_distinct_loras)


class GeneratedImage(ApiModel):
    b64_json: str | None = Field(default=None, description="the PNG, base64")
    url: str | None = None
    revised_prompt: str | None = None


class GenerateResponse(ApiModel):
    images: list[GeneratedImage]
    seed: int = Field(description="the first image's seed; image i used seed + i")
    seeds: list[int]
    model: str
    nsfw_content_detected: list[bool] = Field(description="per image: blacked out if true")
    stage_seconds: dict[str, float] = Field(description="stage name -> seconds spent")


class ImageGenerationRequest(ApiModel):
    """OpenAI's ``POST /v1/images/generations`` body (the fields that apply to a diffusion
    model), plus raygen's optional diffusers-named extensions (``extra_body`` in the
    ``openai`` client)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str = Field(default="1024x1024", pattern=r"^[0-9]+x[0-9]+$", description="WIDTHxHEIGHT")
    response_format: ResponseFormat = "b64_json"
    output_format: Literal["png"] = "png"
    user: str | None = None
    safety_identifier: str | None = None
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=28, ge=1, le=200)
    guidance_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    loras: list[LoraRef] = LORAS_FIELD

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value

    _loras_distinct = field_validator("loras")(_distinct_loras)


class ImageGenerationResponse(BaseModel):
    """OpenAI's images response; raygen adds the seeds and the time in each stage."""

    created: int
    data: list[GeneratedImage]
    output_format: Literal["png"] = "png"
    seed: int
    seeds: list[int]
    nsfw_content_detected: list[bool]
    stage_seconds: dict[str, float]


class LoraInfo(ApiModel):
    name: str
    size_bytes: int = Field(description="the adapter's weights file")
    base: str | None = Field(
        default=None, description="the bundle it was trained on, where recorded (raygen train)"
    )


class LoraList(ApiModel):
    loras: list[LoraInfo]


class ModelCard(ApiModel):
    """One served model, as OpenAI's ``GET /v1/models`` lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "raygen"


class ModelList(ApiModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VideoRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image: str | None = Field(
        default=None,
        max_length=MAX_IMAGE_CHARS,
        description=(
            "the picture an image-to-video model animates (its first frame): a PNG, JPEG or "
            "WebP, base64-encoded or as a data: URL; resized to height x width"
        ),
    )
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=30.0)
    height: int = Field(default=480, ge=8)
    width: int = Field(default=832, ge=8)
    num_frames: int = Field(default=81, ge=1)
    fps: int = Field(default=16, ge=1, le=60)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="random when omitted")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value


VideoStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class VideoJob(ApiModel):
    """A video job as ``/v1/videos`` reports it: ``step`` of ``num_steps`` denoising steps
    done; ``url`` once succeeded (presigned for s3:// output); times in Unix seconds."""

    id: str
    status: VideoStatus
    step: int = 0
    num_steps: int
    seed: int
    url: str | None = None
    error: str | None = None
    nsfw_content_detected: bool = Field(
        default=False, description="the safety checker flagged a frame: every frame is black"
    )
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
