"""Configuration: precedence, defaults and one-line errors."""

import pytest

from controller.config import ConfigError, load_config, load_config_with_sources, render_config
from controller.cluster.ray_adapter import object_store_bytes


def test_cli_beats_env_beats_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('role = "head"\nray-port = 7001\ncontrol_port = 9001\nwait_timeout = 11\n')
    env = {"LLMCTL_RAY_PORT": "7002", "LLMCTL_CONTROL_PORT": "9002"}
    c = load_config(["--config", str(f), "--control-port", "9003"], env)
    assert (c.role, c.ray_port, c.control_port, c.wait_timeout) == ("head", 7002, 9003, 11.0)


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('role = "worker"\nhead_address = "10.0.0.1:6379"\n')
    c = load_config([], {"LLMCTL_CONFIG": str(f)})
    assert c.role == "worker" and (c.head_host, c.head_port) == ("10.0.0.1", 6379)


def test_local_cluster_defaults():
    c = load_config(["--role", "head", "--local-workers", "2"], {})
    assert c.node_ip_address == "127.0.0.2"
    assert c.expected_workers == 2 and c.expected_nodes == 3
    assert c.node_id == "head-127.0.0.2"


@pytest.mark.parametrize("argv,env,message", [
    ([], {}, "--role is required"),
    (["--role", "boss"], {}, "invalid choice"),
    (["--role", "worker"], {}, "needs --head-address"),
    (["--role", "worker", "--head-address", "nohost"], {}, "HOST:PORT"),
    (["--role", "worker", "--head-address", "h:99999"], {}, "port from 1 to 65535"),
    (["--role", "head", "--ray-port", "0"], {}, "ray-port must be a port"),
    (["--role", "head", "--ray-port", "abc"], {}, "invalid value 'abc' for ray-port"),
    (["--role", "head"], {"LLMCTL_WAIT_TIMEOUT": "soon"}, "environment LLMCTL_WAIT_TIMEOUT"),
    (["--role", "head", "--wait-timeout", "-1"], {}, "wait-timeout must be greater than 0"),
    (["--role", "head", "--node-ip-address", "not-an-ip"], {}, "not an IP address"),
    (["--role", "head", "--local-workers", "2", "--expected-workers", "1"], {}, "less than local-workers"),
    (["--role", "worker", "--head-address", "h:1", "--local-workers", "1"], {}, "head only"),
    (["--role", "head", "--join-attempts", "0"], {}, "join-attempts must be 1 or more"),
    (["--role", "head", "--replicas", "3", "--local-workers", "1"], {}, "--replicas 3 is more than the cluster's nodes (2)"),
    (["--role", "head", "--mode", "sharded", "--replicas", "2"], {}, "sharded mode runs one engine"),
    (["--role", "head", "--tensor-parallel-size", "2"], {}, "are for --mode sharded"),
    (["--role", "head", "--engine-port", "70000"], {}, "engine-port must be a port"),
    (["--role", "head", "--probe-interval", "0"], {}, "probe-interval must be greater than 0"),
    (["--role", "head", "--engine-restarts", "-1"], {}, "engine-restarts must be 0 or more"),
    (["--role", "head", "--bogus"], {}, "unrecognized arguments"),
])
def test_bad_input_is_one_clear_line(argv, env, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.toml")], {})
    bad = tmp_path / "bad.toml"
    bad.write_text("role = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(bad)], {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('role = "head"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_config(["--config", str(unknown)], {})


def test_object_store_sizing():
    gb = 10**9
    assert object_store_bytes(10 * gb, 100 * gb) == 3 * gb          # 30% of memory
    assert object_store_bytes(100 * gb, 2 * gb) == 2 * gb           # /dev/shm is smaller
    assert object_store_bytes(2000 * gb, 1000 * gb) == 200 * gb     # the 200 GB cap
    assert object_store_bytes(30 * gb, 100 * gb, nodes_on_machine=3) == 3 * gb  # shared on one machine
    assert object_store_bytes(100, 100) == 78 * 1024 * 1024         # Ray's minimum


def test_api_key_is_masked_wherever_config_is_shown():
    c = load_config(["--role", "head", "--engine", "none"], {"LLMCTL_API_KEY": "s3cret"})
    assert c.api_key == "s3cret"
    assert c.printable()["api_key"] == "***" and "s3cret" not in str(c.printable())
    assert load_config(["--role", "head", "--engine", "none"], {}).printable()["api_key"] is None
    with pytest.raises(ConfigError, match="api-key is empty"):
        load_config(["--role", "head", "--api-key", " "], {})


def test_print_config_says_where_each_value_came_from_and_masks_secrets(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('control-port = 9100\nwait-timeout = 12.5\n')
    env = {"LLMCTL_WAIT_TIMEOUT": "30", "LLMCTL_API_KEY": "do-not-show-me"}
    config, sources = load_config_with_sources(["--role", "head", "--config", str(cfg), "--serve-port", "9000"], env)
    assert (config.control_port, config.wait_timeout, config.serve_port) == (9100, 30.0, 9000)
    assert sources["control_port"] == f"config file {cfg}"
    assert sources["wait_timeout"] == "environment LLMCTL_WAIT_TIMEOUT"
    assert sources["serve_port"] == "command line" and sources["ray_port"] == "default"
    assert sources["node_id"] == "derived"
    text = render_config(config, sources)
    assert "do-not-show-me" not in text and 'api-key = "***"  # environment LLMCTL_API_KEY' in text
    assert "wait-timeout = 30.0  # environment LLMCTL_WAIT_TIMEOUT" in text
    # The output is a config file: read back, it gives the same settings (the masked secret aside).
    back = tmp_path / "back.toml"
    back.write_text(text.replace('api-key = "***"', "# api-key"))
    again = load_config(["--config", str(back)], {})
    assert {k: v for k, v in again.as_dict().items() if k != "api_key"} == \
        {k: v for k, v in config.as_dict().items() if k != "api_key"}


def test_flags_are_never_abbreviated():
    with pytest.raises(ConfigError, match="unrecognized arguments: --print"):
        load_config(["--role", "head", "--print"], {})


@pytest.mark.parametrize("where", ["command line", "environment", "config file"])
@pytest.mark.parametrize("state_dir", ["state", "./state", "0", "~/state", ""])
def test_a_relative_state_dir_is_one_clear_error(tmp_path, monkeypatch, where, state_dir):
    # The head writes its epoch and Ray token there; relative, they would land in whatever the
    # working directory is (a checkout: that is how ray-auth-token files got committed).
    monkeypatch.chdir(tmp_path)
    argv, env = ["--role", "head", "--engine", "none"], {}
    if where == "command line":
        argv += ["--state-dir", state_dir]
    elif where == "environment":
        env["LLMCTL_STATE_DIR"] = state_dir or "."  # an empty variable means unset
        state_dir = state_dir or "."
    else:
        (tmp_path / "c.toml").write_text(f'state-dir = "{state_dir}"\n')
        argv += ["--config", str(tmp_path / "c.toml")]
    with pytest.raises(ConfigError) as err:
        load_config(argv, env)
    assert str(err.value) == f"state-dir must be an absolute path, got {state_dir!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c.toml"] if where == "config file" else [])


def test_the_default_state_dir_is_absolute_and_a_relative_home_is_refused(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_config(["--role", "head", "--engine", "none"], {}).state_dir == "/home/someone/.cache/llm-controller"
    monkeypatch.setenv("HOME", "someone")
    with pytest.raises(ConfigError) as err:
        load_config(["--role", "head", "--engine", "none"], {})
    assert str(err.value) == ("state-dir must be an absolute path, got 'someone/.cache/llm-controller' "
                              "(the default, from HOME)")


def test_loading_a_config_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    for argv in (["--role", "head", "--engine", "none"], ["--role", "head", "--local-workers", "2"],
                 ["--role", "worker", "--head-address", "h:1"]):
        config, sources = load_config_with_sources([*argv, "--state-dir", str(state)], {})
        render_config(config, sources)  # what --print-config shows
    assert list(tmp_path.iterdir()) == []
