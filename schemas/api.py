"""HTTP API contracts. Field names follow diffusers' call arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 2000


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=28, ge=1, le=200)
    guidance_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    height: int = Field(default=1024, ge=8)
    width: int = Field(default=1024, ge=8)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="random when omitted")
    num_images_per_prompt: int = Field(default=1, ge=1, le=8)
    refiner: bool = False
    denoising_end: float = Field(default=0.8, gt=0.0, lt=1.0, description="base/refiner handoff")
    upscale: int = Field(default=0, ge=0, description="super-resolution stages to run")
    response_format: Literal["b64_json", "url"] = "b64_json"


class GeneratedImage(ApiModel):
    b64_json: str | None = None
    url: str | None = None


class GenerateResponse(ApiModel):
    images: list[GeneratedImage]
    seed: int
    stage_seconds: dict[str, float] = Field(description="stage name -> seconds spent")


class VideoRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=30.0)
    height: int = Field(default=480, ge=8)
    width: int = Field(default=832, ge=8)
    num_frames: int = Field(default=81, ge=1)
    fps: int = Field(default=16, ge=1, le=60)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


VideoStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class VideoJob(ApiModel):
    id: str
    status: VideoStatus
    step: int = 0
    num_steps: int
    seed: int
    url: str | None = None
    error: str | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
