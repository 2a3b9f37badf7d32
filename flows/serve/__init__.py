"""`raygen serve`: multi-stage text-to-image generation on Ray Serve.

Each stage is one deployment wrapping an ``actors/`` class, with its own replicas (or
autoscaling, scale to zero included), resources, queue bounds and batching, all from
``ServeConfig``::

    ingress (ingress.py: FastAPI per replica; auth, check_inputs, prompt filter, native and
             OpenAI routes, URL outputs, the time limit)
      -> graph (graph.py: ImageGraph; one request through the stages, each stage's
                response passed on to the next stage's call)
           -> text_encoder (CLIP + T5, LRU cache; batched)
           -> base (SD3 DiT, CFG as one forward; requests batched by shape and step count;
                    streams steps to a streaming request; a batch whose requests were all
                    cancelled stops between steps)
           -> refiner (optional per request: the base stops at denoising_end, it continues)
           -> vae_decode
           -> super_resolution_1..n (optional per request: x4 stages, noise-level conditioning)
           -> safety (image check, invisible watermark, PNG)

    video (video_jobs.py, when configured; asynchronous jobs: POST /v1/videos, GET/DELETE
    /v1/videos/{id}): ingress -> video_jobs (job records; drives each job)
      -> video_text_encoder (UMT5) -> video_denoiser (Wan DiT; streams progress per step)
      -> video_vae_decode (Wan VAE, safety check and watermark on every frame, MP4)
      -> storage (the MP4, and each job's record as JSON, so jobs outlive the replica)

The stages' deployments are in stages.py (image), safety.py and video_stages.py, each
importing only the models its replicas run; what they pass each other is in messages.py,
what a request may ask in checks.py, and the app is built in app.py:
``serve run flows.serve:app_builder config=serve.yaml``.
"""

# The app (and with it every stage's torch and diffusers) is imported on first use, not with
# the package: a replica of the ingress, the graph or the video jobs imports this package
# before its own module and would otherwise pay seconds for models it never holds.
_APP_NAMES = (
    "APP_NAME",
    "AppArgs",
    "api_key_digests",
    "app_builder",
    "build_app",
    "deployment_options",
    "run_serve",
)
__all__ = list(_APP_NAMES)


def __getattr__(name: str) -> object:
    if name in _APP_NAMES:
        from flows.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
