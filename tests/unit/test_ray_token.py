"""Where the Ray token comes from, and what the controller's process gets."""

import os
import stat

import pytest

from controller.cluster import ray_token
from controller.config import ConfigError, load_config


def cfg(tmp_path, *argv, env=None):
    return load_config(["--state-dir", str(tmp_path / "state"), *argv], env or {})


def test_resolving_decides_but_writes_nothing(tmp_path, monkeypatch):
    # Loading and resolving happen for --print-config and before pre-flight too: no file may appear.
    monkeypatch.chdir(tmp_path)
    head = cfg(tmp_path, "--role", "head", "--engine", "none")
    auth = ray_token.resolve(head)
    path = tmp_path / "state" / "ray-auth-token"
    assert auth.mode == "token" and auth.env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert auth.head_token == str(path)
    assert list(tmp_path.iterdir()) == []  # not even the state dir


def test_the_head_makes_a_private_token_at_start_up_once_and_reuses_it(tmp_path):
    head = cfg(tmp_path, "--role", "head", "--engine", "none")
    first = ray_token.resolve(head)
    ray_token.ensure_head_token(first)
    path = tmp_path / "state" / "ray-auth-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token.strip()) == 64
    again = ray_token.resolve(head)  # a restart keeps it
    ray_token.ensure_head_token(again)
    assert again.env == first.env and path.read_text() == token
    assert token.strip() not in first.source


def test_an_unusable_head_token_file_is_a_config_error_at_start_up(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ray-auth-token").write_text("\n")
    auth = ray_token.resolve(cfg(tmp_path, "--role", "head", "--engine", "none"))
    with pytest.raises(ConfigError, match="ray-token-file is empty"):
        ray_token.ensure_head_token(auth)
    blocked = tmp_path / "file"
    blocked.write_text("")
    auth = ray_token.resolve(load_config(["--state-dir", str(blocked / "state"), "--role", "head",
                                          "--engine", "none"], {}))
    with pytest.raises(ConfigError, match="cannot make the state dir"):
        ray_token.ensure_head_token(auth)


def test_a_token_file_or_the_environment_wins_over_the_heads_own(tmp_path):
    given = tmp_path / "secret"
    given.write_text("s3cret\n")
    auth = ray_token.resolve(cfg(tmp_path, "--role", "worker", "--head-address", "h:1", "--ray-token-file", str(given)))
    assert auth.env["RAY_AUTH_TOKEN_PATH"] == str(given)
    auth = ray_token.resolve(cfg(tmp_path, "--role", "head", "--engine", "none", env={"LLMCTL_RAY_TOKEN": "t0k"}))
    assert auth.env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t0k"} and "t0k" not in auth.source
    ray_token.ensure_head_token(auth)  # the head's start-up step: nothing to make with a token given
    assert not (tmp_path / "state" / "ray-auth-token").exists()


@pytest.mark.parametrize("argv,content,message", [
    (["--role", "worker", "--head-address", "h:1"], None, "a worker needs the cluster's Ray token"),
    (["--role", "worker", "--head-address", "h:1", "--ray-token-file", "{missing}"], None, "ray-token-file not found"),
    (["--role", "worker", "--head-address", "h:1", "--ray-token-file", "{file}"], "  \n", "ray-token-file is empty"),
])
def test_a_worker_without_a_usable_token_is_a_config_error(tmp_path, argv, content, message):
    file = tmp_path / "token"
    if content is not None:
        file.write_text(content)
    argv = [a.format(missing=tmp_path / "nope", file=file) for a in argv]
    with pytest.raises(ConfigError, match=message):
        ray_token.resolve(cfg(tmp_path, *argv))


def test_auth_off_is_said_explicitly_and_apply_replaces_what_was_there(tmp_path, monkeypatch):
    auth = ray_token.resolve(cfg(tmp_path, "--role", "worker", "--head-address", "h:1", "--ray-auth", "none"))
    assert auth.env == {"RAY_AUTH_MODE": "disabled"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ray_token.apply(auth)
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ


def test_rays_refusal_is_recognised():
    assert ray_token.is_refusal("`ray start` failed (exit 1): ... InvalidAuthToken: the token is wrong")
    assert not ray_token.is_refusal("`ray start` failed (exit 1): ConnectionError: GCS unreachable")
