import os
import subprocess
import sys

import numpy as np
import pytest
import ray
from PIL import Image

from actors.watermark import embed_watermark
from flows.cli import build_parser, main
from tests.conftest import REPO

SUBCOMMANDS = [
    "models", "data", "prep", "train", "vae", "distill", "evaluate", "sample", "serve", "generate",
    "watermark", "submit", "demo", "plan",
]  # fmt: skip


def test_every_subcommand_is_registered():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert sorted(choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize(
    "command",
    [[], *[[name] for name in SUBCOMMANDS], ["models", "tiny"], ["data", "shapes"], ["watermark", "detect"]],
)
def test_help_is_useful(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: raygen")
    assert len(out.splitlines()) > 4


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_generate_without_a_server_is_one_line(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "a prompt", "--out", str(out), "--url", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach raygen server" in err
    assert not out.exists()
    # Bad settings are refused before anything is sent.
    assert main(["generate", "a prompt", "--out", str(out), "--steps", "0"]) == 2
    assert "num_inference_steps" in capsys.readouterr().err


def test_watermark_detect_exits_by_verdict(tmp_path, capsys):
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(plain).save(tmp_path / "plain.png")
    Image.fromarray(embed_watermark(plain, "k1")).save(tmp_path / "marked.png")
    assert main(["watermark", "detect", str(tmp_path / "marked.png"), "--key", "k1"]) == 0
    assert "marked.png: watermarked (32/32 bits match)" in capsys.readouterr().out
    assert main(["watermark", "detect", str(tmp_path / "plain.png"), "--key", "k1"]) == 1
    assert "plain.png: no watermark" in capsys.readouterr().out
    assert main(["watermark", "detect", str(tmp_path / "absent.png")]) == 2


def test_watermark_detect_reads_every_frame_of_an_mp4(tmp_path, capsys):
    from actors.video import encode_mp4  # imports diffusers: only this test pays for it

    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:48, 0:64]
    gradient = np.stack([x * 3, y * 4, 255 - x * 2], axis=-1)  # (H, W, 3)
    plain = np.clip(gradient + rng.normal(0, 8, (4, 48, 64, 3)), 0, 255).astype(np.uint8)
    marked = np.stack([embed_watermark(frame, "k1") for frame in plain])
    (tmp_path / "marked.mp4").write_bytes(encode_mp4(marked, fps=8))
    (tmp_path / "half.mp4").write_bytes(encode_mp4(np.concatenate([marked[:2], plain[2:]]), 8))
    assert main(["watermark", "detect", str(tmp_path / "marked.mp4"), "--key", "k1"]) == 0
    assert "marked.mp4: watermarked (4/4 frames carry it" in capsys.readouterr().out
    # A video is watermarked when more than half of its frames are.
    assert main(["watermark", "detect", str(tmp_path / "half.mp4"), "--key", "k1"]) == 1
    assert "half.mp4: no watermark (2/4 frames carry it" in capsys.readouterr().out
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert main(["watermark", "detect", str(tmp_path / "broken.mp4")]) == 2
    assert "broken.mp4: cannot read video" in capsys.readouterr().err


def test_config_error_is_one_message_naming_key_and_file(tmp_path, capsys):
    config = tmp_path / "prep.yaml"
    config.write_text("inptu: ./corpus\n")
    assert main(["prep", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "unknown key 'inptu'" in err
    assert "Traceback" not in err


def test_flags_and_set_reach_the_config(tmp_path):
    from flows.cli import FLOW_FLAGS, _flow_config

    parser = build_parser()
    args = parser.parse_args(
        ["train", "--data", "s3://b/shards", "--bundle", "s3://b/sd3", "--resume",
         "--address", "ray://head:10001", "--set", "max_steps=3"]
    )
    cls, flags = FLOW_FLAGS["train"]
    config = _flow_config(cls, args, flags)
    assert config.data == "s3://b/shards"
    assert config.bundle.uri == "s3://b/sd3"
    assert config.resume is True
    assert config.ray.address == "ray://head:10001"
    assert config.max_steps == 3


def test_submit_without_a_command_is_a_user_error(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2
    assert "name the raygen command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "demo"],
        ["demo", "--verbose"],
        ["models", "tiny", "--out", "x", "-v"],
        ["watermark", "detect", "a.png", "-v"],
    ],
)
def test_verbose_is_accepted_before_and_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_quiet_is_the_default_and_submit_passes_its_command_flags_on():
    assert build_parser().parse_args(["demo"]).verbose is False
    args = build_parser().parse_args(["submit", "--", "prep", "-v"])
    assert args.verbose is False and args.argv == ["--", "prep", "-v"]


@pytest.mark.slow
def test_a_failing_worker_is_shown_on_the_quiet_console(
    sample_run, tiny_bundles, ray_local, tmp_path
):
    # Worker output stays in Ray's logs by default; a worker's error must not. The captioner
    # stage given the CLIP scorer's bundle fails where it loads, in a Ray Data actor. The
    # driver joins the session's Ray (as a Ray Job's command does) instead of starting one.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("synthetic_00.png", "synthetic_00.txt"):
        (corpus / name).write_bytes((sample_run.data / "corpus" / name).read_bytes())
    result = subprocess.run(
        [
            sys.executable, "-m", "flows.cli", "prep",
            "--input", str(corpus),
            "--output", str(tmp_path / "shards"),
            "--bundle", str(tiny_bundles["t2i"]),
            "--set", f"video_bundle.uri={tiny_bundles['t2v']}",
            "--set", f"filters.scorer.uri={tiny_bundles['scorer']}",
            "--set", f"caption.model.uri={tiny_bundles['scorer']}",
        ],  # fmt: skip
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout
    assert "Traceback" in result.stderr
    # The captioner's own frame and the loader's error, from the actor holding the model stages.
    assert 'actors/captioner.py", line' in result.stderr, result.stderr[-3000:]
    assert "CLIPConfig" in result.stderr, result.stderr[-3000:]
