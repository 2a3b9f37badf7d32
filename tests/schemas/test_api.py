import pytest
from pydantic import ValidationError

from schemas.api import GenerateRequest, VideoJob


def test_defaults_follow_diffusers_names():
    request = GenerateRequest(prompt="a cat")
    assert request.num_inference_steps > 0 and request.guidance_scale >= 0
    assert request.seed is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("num_inference_steps", 0),
        ("guidance_scale", -1),
        ("height", 4),
        ("colour", 1),
    ],
)
def test_bad_requests_name_the_field(field, value):
    payload = {"prompt": "a cat", field: value}
    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate(payload)
    assert field in str(err.value)


def test_video_job_round_trip():
    job = VideoJob(
        id="j1", status="running", step=3, num_steps=30, seed=7, created_at=1.5e9, started_at=1.6e9
    )
    assert VideoJob.model_validate_json(job.model_dump_json()) == job
