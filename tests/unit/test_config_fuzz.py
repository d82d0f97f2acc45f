"""Hostile configuration, property-based: whatever the flags, environment and
config file say, loading either gives a valid Config or raises ConfigError with
one line, and so do the pre-flight checks and the Ray token after it; never
another exception, and no file written. (The CLI's exit code and its single stderr
line for such input: tests/cli/test_cli_fuzz.py.)"""

from __future__ import annotations

import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.cluster import ray_token
from controller.config import OPTIONS, ConfigError, load_config_with_sources, render_config
from controller.preflight import PreflightError, local_checks

FLAGS = ["--" + o.name.replace("_", "-") for o in OPTIONS] + ["--config", "--print-config", "--bogus", "-x"]
NASTY = st.sampled_from(["", " ", "-1", "0", "1", "65536", "1e309", "nan", "inf", "-inf", "true", "head", "worker",
                         "auto", "127.0.0.2", "h:1", "/no/such/model", "./m\x00", "~nobody/x", "/etc/hostname", "h:", ":1", "999.1.1.1", "tiny", "none", "vllm", "\x00", "é",
                         "a" * 300, "replicated", "sharded", "json", "1.5", "0x10", "--role"])
VALUES = st.one_of(NASTY, st.text(alphabet=string.printable, max_size=20), st.integers(-10, 10**6).map(str))


BASES = [["--role", "head", "--engine", "none"], ["--role", "head"], ["--role", "head", "--local-workers", "2"],
         ["--role", "worker", "--head-address", "h:1"], ["--role", "auto"], []]


@st.composite
def argv(draw):
    """Mostly a valid command line with a few settings changed, sometimes noise."""
    out = list(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(FLAGS))
        out.append(flag)
        if flag != "--print-config" and draw(st.integers(0, 9)) > 0:  # now and then a value is missing
            out.append(draw(VALUES))
    return out


@st.composite
def environ(draw):
    names = ["LLMCTL_" + o.name.upper() for o in OPTIONS] + ["LLMCTL_CONFIG", "SLURM_NODEID", "SLURM_JOB_NODELIST"]
    return draw(st.dictionaries(st.sampled_from(names), VALUES, max_size=4))


TOML_VALUES = st.one_of(st.integers(-5, 70000), st.floats(allow_nan=True), st.booleans(),
                        st.text(alphabet=string.ascii_letters + "./:-", max_size=12))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=argv(), env=environ(), file_items=st.dictionaries(
    st.sampled_from([o.name.replace("_", "-") for o in OPTIONS] + ["nonsense"]), TOML_VALUES, max_size=3),
    raw_file=st.one_of(st.none(), st.text(max_size=40)))
def test_any_input_is_a_config_or_one_clear_line(tmp_path_factory, args, env, file_items, raw_file):
    tmp = tmp_path_factory.mktemp("cfg")
    if file_items or raw_file is not None:
        path = tmp / "c.toml"
        if raw_file is not None:
            path.write_text(raw_file)
        else:
            path.write_text("\n".join(f"{k} = {_toml(v)}" for k, v in file_items.items()) + "\n")
        args = ["--config", str(path), *args]
    env = {**env, "LLMCTL_STATE_DIR": str(tmp / "state")}
    # A fuzzed --state-dir may be relative ("0"): it is refused (ConfigError). Run from the
    # temporary folder all the same, so that a stray write lands there, not in the checkout,
    # and the check below sees it: loading and resolving write nothing, not even the state dir.
    here = os.getcwd()
    os.chdir(tmp)
    try:
        _check(args, env)
    finally:
        os.chdir(here)
    assert sorted(p.name for p in tmp.iterdir()) == (["c.toml"] if file_items or raw_file is not None else [])


def _check(args, env) -> None:
    try:
        config, sources = load_config_with_sources(args, env)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        return
    assert config.role in ("head", "worker")
    assert os.path.isabs(config.state_dir)  # a relative one is a ConfigError
    # What the CLI runs next, before it starts anything: pre-flight and the Ray token.
    try:
        local_checks(config)
        ray_token.resolve(config)
    except (PreflightError, ConfigError) as exc:
        assert str(exc) and "\n" not in str(exc)
    assert 1 <= config.ray_port <= 65535 and 1 <= config.control_port <= 65535
    text = render_config(config, sources)  # what --print-config shows: always renderable
    if config.api_key:
        assert 'api-key = "***"' in text and f"api-key = {config.api_key!r}" not in text


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
