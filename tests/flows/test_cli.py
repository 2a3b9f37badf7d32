import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import PENDING_FLOWS, build_parser, main

REPO = Path(__file__).parents[2]
SUBCOMMANDS = ["models", "prep", "train", "distill", "serve", "generate", "submit", "demo"]


def test_every_subcommand_is_registered():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert sorted(choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", [[], *[[name] for name in SUBCOMMANDS], ["models", "tiny"]])
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


@pytest.mark.parametrize("command", sorted(PENDING_FLOWS))
def test_pending_flows_say_so_in_one_line(command, capsys):
    argv = [command, "a prompt", "--out", "x.png"] if command == "generate" else [command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not built yet" in err


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
