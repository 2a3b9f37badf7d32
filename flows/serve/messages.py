"""What the serving graph's parts pass each other: plain values, importable without torch or
diffusers, so the parts that only route requests (the ingress, the graph, the video jobs)
start their replicas in seconds; the stages, which hold the models, import those.

An image stage takes and returns a `Staged` value: what it made plus the seconds each stage
that led to it spent in its replica. So the graph can pass a stage's response straight on to
the next stage's call (the data goes stage to stage through Ray's object store, never back
through the caller) and still report every stage's seconds from the last stage's result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.families import Multiples
    from actors.generation import DenoiseRequest
    from actors.video import VideoDenoiseRequest, VideoEmbeddings, VideoImageConditioning


@dataclass(frozen=True)
class Staged:
    """A stage's output and the seconds (in the replica, a batch's wait included) that each
    stage behind it took, in graph order. A request of n images makes n denoiser calls at
    once: a stage after them counts the slowest."""

    value: Any
    seconds: dict[str, float]
    stage: str  # the stage that made it, as ``seconds`` names it

    @classmethod
    def after(cls, value: Any, inputs: tuple[Staged, ...], stage: str, start: float) -> Staged:
        seconds: dict[str, float] = {}
        for item in inputs:
            for name, spent in item.seconds.items():
                seconds[name] = max(spent, seconds.get(name, 0.0))
        seconds[stage] = time.perf_counter() - start
        return cls(value, seconds, stage)


@dataclass(frozen=True)
class EncodeItem:
    """One request's texts for the shared text encoders."""

    prompt: str
    negative_prompt: str | None
    max_sequence_length: int


@dataclass(frozen=True)
class DenoiseSpec:
    """One image's denoising settings; the stage adds the embeddings and, for a refiner, the
    latents the base stopped at (both arrive as the previous stages' results)."""

    seed: int
    guidance_scale: float
    height: int
    width: int
    num_inference_steps: int
    denoising_start: float | None = None
    denoising_end: float | None = None
    adapters: tuple[tuple[str, float], ...] = ()  # (LoRA name, scale), sorted by name

    def request(self, embeddings: Staged, latents: Staged | None) -> DenoiseRequest:
        # Called in the denoiser's replica, which has the models' modules loaded already.
        from actors.generation import DenoiseRequest

        return DenoiseRequest(
            embeddings=embeddings.value,
            latents=None if latents is None else latents.value,
            **asdict(self),
        )


@dataclass(frozen=True)
class FinishedImages:
    pngs: list[bytes]
    flagged: list[bool]  # per image: the checker blacked it out


@dataclass(frozen=True)
class VideoDenoiseSpec:
    """One video job's denoising settings; the denoiser stage adds the embeddings."""

    seed: int
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float

    def request(
        self, embeddings: VideoEmbeddings, image: VideoImageConditioning | None = None
    ) -> VideoDenoiseRequest:
        # Called in the video denoiser's replica, which has the models' modules loaded.
        from actors.video import VideoDenoiseRequest

        return VideoDenoiseRequest(embeddings=embeddings, image=image, **asdict(self))


@dataclass(frozen=True)
class VideoModel:
    """What the ingress checks a video request against, asked once of the denoiser stage."""

    pipeline: str  # the bundle's pipeline class
    multiples: Multiples
    takes_image: bool  # image-to-video: every request carries the picture to animate
