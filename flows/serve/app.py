"""Building the serving app from one ``ServeConfig``: one deployment per stage, an image
graph per served model, video jobs when configured, and the ingress in front.

``build_app`` is the one place the app is built: ``raygen serve`` runs it locally, and ``serve
run flows.serve:app_builder config=serve.yaml`` or a Serve config file's ``import_path:
flows.serve:app_builder`` (``args: {config: ...}``) deploy the same app.
"""

import hashlib
import os
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve

from cluster.ray_runtime import init_ray
from cluster.storage import Storage, is_s3, local_path
from flows.serve.checks import check_refiner, same_text_encoders
from flows.serve.graph import ImageGraph
from flows.serve.ingress import Ingress
from flows.serve.safety import SafetyStage
from flows.serve.stages import (
    DenoiserStage,
    SuperResolutionDeployment,
    TextEncoderStage,
    VaeDecodeStage,
)
from flows.serve.video_jobs import VideoJobs
from flows.serve.video_stages import VideoDecodeStage, VideoDenoiserStage, VideoTextEncoderStage
from schemas.config import (
    ConfigError,
    DeploymentSettings,
    ModelRef,
    ServeConfig,
    ServedModel,
    load_config,
)

APP_NAME = "raygen"


def deployment_options(
    name: str, settings: DeploymentSettings, retry_after_s: float
) -> dict[str, Any]:
    """A stage's Serve deployment options from its settings."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {
            "num_cpus": settings.num_cpus,
            "num_gpus": settings.num_gpus,
            "resources": settings.resources,
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "health_check_period_s": settings.health_check_period_s,
        # Beyond the queue: 503 with Retry-After, whichever stage is full.
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
    }
    if settings.autoscaling is None:
        options["num_replicas"] = settings.num_replicas
    else:
        options["autoscaling_config"] = settings.autoscaling.model_dump(exclude_none=True)
    return options


def api_key_digests(config: ServeConfig) -> list[bytes] | None:
    """SHA-256 digests of the keys in ``$api_keys_env``; only digests leave this process."""
    if config.api_keys_env is None:
        return None
    keys = [key.strip() for key in os.environ.get(config.api_keys_env, "").split(",")]
    keys = [key for key in keys if key]
    if not keys:
        raise ConfigError(
            f"api_keys_env: environment variable {config.api_keys_env} is unset or holds no "
            "keys; set it to comma-separated keys, or set api_keys_env: null to serve without auth"
        )
    return [hashlib.sha256(key.encode()).digest() for key in keys]


def build_app(config: ServeConfig) -> serve.Application:
    """The whole graph, one deployment per stage, from one config."""
    config = _absolute_local_paths(config)
    deployments, retry = config.deployments, config.retry_after_s
    storage = config.storage

    def bind(cls: Any, name: str, settings: DeploymentSettings, *args: Any) -> Any:
        return cls.options(**deployment_options(name, settings, retry)).bind(*args)

    super_resolution = [
        bind(
            SuperResolutionDeployment, f"super_resolution_{index}", stage.deployment, stage, storage
        )
        for index, stage in enumerate(config.super_resolution, start=1)
    ]
    safety = bind(SafetyStage, "safety", deployments.safety, config.safety, storage)
    video_jobs = None
    if config.video is not None:
        video, video_deployments = config.video, config.video.deployments
        video_jobs = bind(
            VideoJobs,
            "video_jobs",
            video_deployments.jobs,
            video,
            config.output,
            storage,
            bind(
                VideoTextEncoderStage,
                "video_text_encoder",
                video_deployments.text_encoder,
                video.bundle,
                storage,
            ),
            bind(
                VideoDenoiserStage,
                "video_denoiser",
                video_deployments.denoiser,
                video.bundle,
                storage,
            ),
            bind(
                VideoDecodeStage,
                "video_vae_decode",
                video_deployments.vae_decode,
                video.bundle,
                storage,
                config.safety,
            ),
        )
    # One graph per served model, sharing super-resolution and safety; a text encoder stage
    # serves every model whose bundle holds the same text encoders.
    graphs: dict[str, Any] = {}
    text_encoders: dict[str, Any] = {}  # model name -> its text encoder stage (maybe shared)
    for model, shares in zip(config.served_models, shared_text_encoders(config), strict=True):
        stages = model.deployments
        main = model.name == config.model_name

        def name(stage: str, model: ServedModel = model, main: bool = main) -> str:
            return stage if main else f"{stage}_{model.name}"

        if shares is None:
            text_encoders[model.name] = bind(
                TextEncoderStage,
                name("text_encoder"),
                stages.text_encoder,
                model.bundle,
                storage,
                stages.text_encoder,
                config.text_cache_size,
            )
        else:
            text_encoders[model.name] = text_encoders[shares]
        base = bind(
            DenoiserStage,
            name("base"),
            stages.base,
            model.bundle,
            storage,
            stages.base,
            config.loras if main else None,  # adapters are made for the main model
        )
        refiner = None
        if model.refiner is not None:
            refiner = bind(
                DenoiserStage,
                name("refiner"),
                stages.refiner,
                model.refiner,
                storage,
                stages.refiner,
                None,
                (model.bundle, refiner_field(config, model)),  # checked at its start
                config.text_cache_size,  # for a refiner with text encoders of its own
            )
        vae_decode = bind(
            VaeDecodeStage, name("vae_decode"), stages.vae_decode, model.bundle, storage
        )
        graphs[model.name] = bind(
            ImageGraph,
            name("graph"),
            stages.graph,
            config.max_sequence_length,
            text_encoders[model.name],
            base,
            refiner,
            vae_decode,
            super_resolution,
            safety,
        )
    return bind(
        Ingress, "ingress", deployments.ingress, config, api_key_digests(config), graphs, video_jobs
    )


def check_refiners(config: ServeConfig) -> None:
    """Every served model's refiner shares its base's latent space (``check_refiner``)."""
    storage = Storage(config.storage)
    for model in config.served_models:
        if model.refiner is not None:
            check_refiner(model.bundle, model.refiner, storage, refiner_field(config, model))


def refiner_field(config: ServeConfig, model: ServedModel) -> str:
    return "refiner" if model.name == config.model_name else f"models.{model.name}.refiner"


def shared_text_encoders(config: ServeConfig) -> list[str | None]:
    """Per served model (``served_models``' order), the earlier model whose text encoder stage
    it uses, or None for one of its own: the same family, and byte-identical text encoders and
    tokenizers (``same_text_encoders``)."""
    if len(config.served_models) == 1:
        return [None]  # nothing to share: the bundle is not read here
    storage = Storage(config.storage)
    shares: list[str | None] = []
    for index, model in enumerate(config.served_models):
        owners = [config.served_models[i] for i in range(index) if shares[i] is None]
        shares.append(
            next(
                (o.name for o in owners if same_text_encoders(o.bundle, model.bundle, storage)),
                None,
            )
        )
    return shares


class AppArgs(BaseModel):
    """``serve run flows.serve:app_builder config=FILE [key.path=value ...]``, or a Serve
    config file's ``args``: the config file (optional) and overrides of its keys."""

    model_config = ConfigDict(extra="allow")

    config: str | None = None


def app_builder(args: AppArgs) -> serve.Application:
    """Entry for ``serve run flows.serve:app_builder config=serve.yaml [key.path=value ...]``
    and Serve config files (``import_path: flows.serve:app_builder``, ``args: {config: ...}``).
    Serve validates ``args`` into ``AppArgs``; a plain dict is taken too."""
    args = AppArgs.model_validate(args)
    overrides = [f"{key}={value}" for key, value in (args.model_extra or {}).items()]
    return build_app(load_config(ServeConfig, args.config, overrides))


def run_serve(config: ServeConfig) -> None:
    """`raygen serve`: start the graph on Ray (local unless configured) and serve until
    interrupted."""
    check_refiners(config)  # before anything starts
    init_ray(config.ray)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    # The replicas' own log lines stay in Ray's logs (quiet console): say where to go here.
    print(f"[raygen] serving at http://{config.host}:{config.port} (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.shutdown()


def _absolute_local_paths(config: ServeConfig) -> ServeConfig:
    """Local paths made absolute here, so replicas started in another folder find them."""

    def absolute(uri: str) -> str:
        return uri if is_s3(uri) else str(local_path(uri).absolute())

    def model(ref: ModelRef | None) -> ModelRef | None:
        return None if ref is None else ref.model_copy(update={"uri": absolute(ref.uri)})

    return config.model_copy(
        update={
            "bundle": model(config.bundle),
            "refiner": model(config.refiner),
            "super_resolution": [
                stage.model_copy(update={"model": model(stage.model)})
                for stage in config.super_resolution
            ],
            "safety": config.safety.model_copy(
                update={"image_checker": model(config.safety.image_checker)}
            ),
            "output": absolute(config.output),
            "loras": None
            if config.loras is None
            else config.loras.model_copy(update={"registry": absolute(config.loras.registry)}),
            "video": None
            if config.video is None
            else config.video.model_copy(update={"bundle": model(config.video.bundle)}),
            "models": [
                served.model_copy(
                    update={"bundle": model(served.bundle), "refiner": model(served.refiner)}
                )
                for served in config.models
            ],
        }
    )
