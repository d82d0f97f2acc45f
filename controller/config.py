"""Configuration: one settings object from flags, environment and a config file.

Precedence: command line > environment (LLMCTL_<NAME>) > config file (TOML) >
built-in defaults. Every value is validated before anything starts; a bad
value is a `ConfigError` with a one-line message.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

ENV_PREFIX = "LLMCTL_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent.

    Its message is one line whatever it quotes (a path may hold a newline)."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    flag_only: bool = False  # a switch: `--flag` means true
    secret: bool = False  # never logged or printed


OPTIONS: tuple[Option, ...] = (
    Option("role", str, None, "this node's role ('auto': from the Slurm job: node 0 is the head)",
           ("head", "worker", "auto")),
    Option("head_address", str, None, "HOST:PORT of the head's Ray GCS (workers)"),
    Option("ray_port", int, 6379, "Ray GCS port on the head"),
    Option("node_ip_address", str, None, "this node's IP as Ray sees it"),
    Option("node_id", str, None, "stable name of this node (default: ROLE-IP)"),
    Option("expected_workers", int, None, "workers the head waits for (default: --local-workers)"),
    Option("wait_timeout", float, 300.0, "seconds the head waits for its workers"),
    Option("join_attempts", int, 5, "worker: attempts to join the head"),
    Option("join_delay", float, 10.0, "worker: seconds between join attempts"),
    Option("join_attempt_timeout", float, 60.0, "worker: bound on one join attempt, seconds"),
    Option("mode", str, None, "engine topology (default: sharded with GPUs, else replicated)",
           ("sharded", "replicated")),
    Option("model", str, None, "model path or hub id served by the engines (default without GPUs: tiny)"),
    Option("tensor_parallel_size", int, 1, "sharded mode: tensor parallel size"),
    Option("pipeline_parallel_size", int, 1, "sharded mode: pipeline parallel size"),
    Option("replicas", int, 0, "replicated mode: engine replicas, at most one per node (0: one per node)"),
    Option("engine_port", int, 0, "port of each engine on its node (0: a free one)"),
    Option("engine_timeout", float, 600.0, "seconds an engine may take to become ready"),
    Option("engine_restarts", int, 5, "restarts of a failed engine before it is given up"),
    Option("probe_interval", float, 30.0, "seconds between generation probes of each engine"),
    Option("serve_port", int, 8000, "OpenAI-compatible API port on the head"),
    Option("serve_host", str, "0.0.0.0", "address the OpenAI-compatible API binds to"),
    Option("api_key", str, None, "API key clients must send (Authorization: Bearer KEY); "
           "best set through LLMCTL_API_KEY", secret=True),
    Option("max_body_bytes", int, 4 * 2**20, "largest request body the API accepts, bytes"),
    Option("request_timeout", float, 600.0, "seconds one API request may take"),
    Option("max_in_flight", int, 64, "requests in flight per replica; more wait in a queue"),
    Option("max_continuations", int, 2, "times one request may be continued on another replica when its "
           "replica fails mid-answer (0: never)"),
    Option("control_port", int, 8080, "control HTTP port on the head"),
    Option("control_host", str, "127.0.0.1", "address the control port binds to"),
    Option("drain_timeout", float, 30.0, "seconds a drain waits for in-flight work and workers"),
    Option("degraded_timeout", float, 0.0, "seconds in DEGRADED before draining (0: never)"),
    Option("log_format", str, "auto", "log rendering", ("auto", "json", "console")),
    Option("engine", str, "vllm", "inference engine ('none': cluster only)", ("vllm", "none")),
    Option("local_workers", int, 0, "head: start N worker nodes on this machine"),
    Option("object_store_memory", int, None, "bytes for Ray's object store (default: sized)"),
    Option("ray_health_check", str, "controller",
           "Ray node failure detection settings", ("controller", "ray")),
    Option("health_interval", float, 2.0, "seconds between in-process health checks"),
    Option("health_cli_interval", float, 60.0, "seconds between `ray health-check` runs"),
    Option("failure_threshold", int, 3, "consecutive failed health checks before DEGRADED"),
    Option("tick_interval", float, 1.0, "seconds between reconcile ticks"),
    Option("state_dir", str, None, "where the head keeps its cluster epoch and its Ray token; an absolute "
           "path, $HOME/.cache/llm-controller when unset"),
    Option("ray_auth", str, "token", "Ray token authentication ('none': off on every node)", ("token", "none")),
    Option("ray_token_file", str, None, "file holding the cluster's Ray token (workers: required unless "
           "LLMCTL_RAY_TOKEN; the head makes STATE_DIR/ray-auth-token when given none)"),
    Option("ray_token", str, None, "the cluster's Ray token; best set through LLMCTL_RAY_TOKEN", secret=True),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    role: str
    head_address: str | None
    ray_port: int
    node_ip_address: str | None
    node_id: str
    expected_workers: int
    wait_timeout: float
    join_attempts: int
    join_delay: float
    join_attempt_timeout: float
    mode: str
    model: str | None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    replicas: int
    engine_port: int
    engine_timeout: float
    engine_restarts: int
    probe_interval: float
    serve_port: int
    serve_host: str
    api_key: str | None
    max_body_bytes: int
    request_timeout: float
    max_in_flight: int
    max_continuations: int
    control_port: int
    control_host: str
    drain_timeout: float
    degraded_timeout: float
    log_format: str
    engine: str
    local_workers: int
    object_store_memory: int | None
    ray_health_check: str
    health_interval: float
    health_cli_interval: float
    failure_threshold: int
    tick_interval: float
    state_dir: str
    ray_auth: str
    ray_token_file: str | None
    ray_token: str | None

    @property
    def expected_nodes(self) -> int:
        return 1 + self.expected_workers

    @property
    def head_host(self) -> str:
        assert self.head_address is not None
        return self.head_address.rsplit(":", 1)[0]

    @property
    def head_port(self) -> int:
        assert self.head_address is not None
        return int(self.head_address.rsplit(":", 1)[1])

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def printable(self) -> dict[str, Any]:
        """as_dict() with secrets masked: what may be logged."""
        return {k: ("***" if v and _BY_NAME[k].secret else v) for k, v in self.as_dict().items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage plus a traceback
        raise ConfigError(message)


def operator_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of an operator's command (status, drain): it talks to the head's
    control port, and its errors are one ConfigError line, as the controller's are."""
    parser = _Parser(prog=f"python -m controller {command}", description=description, allow_abbrev=False)
    parser.add_argument("--control-address", default=os.environ.get(ENV_PREFIX + "CONTROL_ADDRESS", "127.0.0.1:8080"),
                        help=f"HOST:PORT of the head's control port (default: 127.0.0.1:8080, or "
                             f"{ENV_PREFIX}CONTROL_ADDRESS)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m controller",
        description="Lifecycle controller: turns machines into one LLM endpoint on Ray.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # `--print` must not quietly mean --print-config (or anything else)
    )
    parser.add_argument("--config", help="TOML config file (also LLMCTL_CONFIG)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (secrets masked) and where each value "
                             "came from, as TOML, then exit; starts nothing")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": f"{o.help} (default: {o.default})"}
        if o.choices:
            kwargs["choices"] = o.choices
        parser.add_argument(flag, dest=o.name, **kwargs)
    return parser


def _parse_value(name: str, raw: Any, source: str) -> Any:
    option = _BY_NAME[name]
    try:
        value = option.parse(raw)
    except (TypeError, ValueError, OverflowError):  # int(inf) from a TOML file overflows
        raise ConfigError(f"{source}: invalid value {raw!r} for {name.replace('_', '-')}") from None
    if option.choices and value not in option.choices:
        raise ConfigError(
            f"{source}: {name.replace('_', '-')} must be one of {', '.join(option.choices)}, got {value!r}"
        )
    return value


def _from_file(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:  # before ValueError, whose subclass it is
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"config file unreadable: {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        if name not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = _parse_value(name, raw, f"config file {path}")
    return values


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _BY_NAME:
        key = ENV_PREFIX + name.upper()
        if key in environ and environ[key] != "":
            values[name] = _parse_value(name, environ[key], f"environment {key}")
    return values


def load_config(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    """Merge the sources and validate. Raises ConfigError with a one-line message."""
    return load_config_with_sources(argv, environ)[0]


def load_config_with_sources(argv: list[str], environ: dict[str, str] | None = None
                             ) -> tuple[Config, dict[str, str]]:
    """The config, and for each setting where its value came from."""
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    args.pop("print_config", None)
    config_path = args.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    sources = {o.name: "default" for o in OPTIONS}
    layers = [(_from_file(config_path) if config_path else {}, f"config file {config_path}"),
              (_from_env(environ), "environment"),
              ({k: _parse_value(k, v, "command line") for k, v in args.items()}, "command line")]
    for values, source in layers:
        merged.update(values)
        sources.update({k: source if source != "environment" else f"environment {ENV_PREFIX}{k.upper()}"
                        for k in values})
    if merged["role"] == "auto":
        _apply_slurm(merged, sources, environ)
    before = dict(merged)
    config = _validate(merged)
    for k, v in config.as_dict().items():
        if before[k] != v and not sources[k].startswith("Slurm"):
            sources[k] = "derived"  # filled in or implied by other settings
    return config, sources


def _apply_slurm(merged: dict[str, Any], sources: dict[str, str], environ: dict[str, str]) -> None:
    """--role auto: the role, the head's address and the worker count from the Slurm job;
    settings given explicitly are kept."""
    from controller.surface.slurm import derive  # imports this module

    slurm = derive(environ, merged["ray_port"])
    merged["role"], sources["role"] = slurm.role, "Slurm (SLURM_NODEID)"
    if slurm.role == "worker" and not merged["head_address"]:
        merged["head_address"], sources["head_address"] = slurm.head_address, "Slurm (SLURM_JOB_NODELIST)"
    if slurm.role == "head" and merged["expected_workers"] is None:
        merged["expected_workers"], sources["expected_workers"] = slurm.expected_workers, "Slurm (SLURM_JOB_NODELIST)"


def render_config(config: Config, sources: dict[str, str]) -> str:
    """The effective config as TOML (usable as a --config file), secrets masked,
    each line saying where its value came from."""
    lines = [f"# effective configuration; precedence: command line > environment ({ENV_PREFIX}NAME) > "
             "config file > defaults"]
    for name, value in config.printable().items():
        key = name.replace("_", "-")
        where = sources.get(name, "default")
        if value is None:
            lines.append(f"# {key} = (unset)  # {where}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}  # {where}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}  # {where}")
        else:
            lines.append(f"{key} = {value!r}  # {where}")
    return "\n".join(lines) + "\n"


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name.replace('_', '-')} must be a port from 1 to 65535, got {port}")


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    port = int(port_text)
    _check_port(what, port)
    return host, port


def _validate(v: dict[str, Any]) -> Config:
    role = v["role"]
    if role is None:
        raise ConfigError("--role is required (head, worker, or auto under Slurm)")
    if role == "worker":
        if not v["head_address"]:
            raise ConfigError("a worker needs --head-address HOST:PORT")
        parse_host_port(v["head_address"], "head-address")
        if v["local_workers"]:
            raise ConfigError("--local-workers is for the head only")
    if v["api_key"] is not None and not v["api_key"].strip():
        raise ConfigError("api-key is empty: leave it unset for no key")
    for name in ("ray_port", "serve_port", "control_port"):
        _check_port(name, v[name])
    if v["node_ip_address"] is not None:
        try:
            ipaddress.ip_address(v["node_ip_address"])
        except ValueError:
            raise ConfigError(f"node-ip-address is not an IP address: {v['node_ip_address']!r}") from None
    if not 0 <= v["local_workers"] <= 250:
        raise ConfigError(f"local-workers must be from 0 to 250, got {v['local_workers']}")
    if v["expected_workers"] is None:
        v["expected_workers"] = v["local_workers"]
    if v["expected_workers"] < 0:
        raise ConfigError(f"expected-workers must be 0 or more, got {v['expected_workers']}")
    if v["expected_workers"] < v["local_workers"]:
        raise ConfigError(
            f"expected-workers ({v['expected_workers']}) is less than local-workers ({v['local_workers']})"
        )
    if v["local_workers"] and v["node_ip_address"] is None:
        # One-machine cluster: each node its own loopback address (Ray rewrites 127.0.0.1).
        v["node_ip_address"] = "127.0.0.2"
    for name in ("wait_timeout", "join_delay", "join_attempt_timeout", "drain_timeout",
                 "health_interval", "health_cli_interval", "tick_interval", "engine_timeout",
                 "probe_interval", "request_timeout"):
        if not v[name] > 0:
            raise ConfigError(f"{name.replace('_', '-')} must be greater than 0, got {v[name]}")
    if v["max_continuations"] < 0:
        raise ConfigError(f"max-continuations must be 0 or more, got {v['max_continuations']}")
    if v["degraded_timeout"] < 0:
        raise ConfigError(f"degraded-timeout must be 0 (never) or more, got {v['degraded_timeout']}")
    for name in ("join_attempts", "failure_threshold", "tensor_parallel_size", "pipeline_parallel_size",
                 "max_body_bytes", "max_in_flight"):
        if v[name] < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be 1 or more, got {v[name]}")
    if v["object_store_memory"] is not None and v["object_store_memory"] < 78 * 1024 * 1024:
        raise ConfigError("object-store-memory must be at least 78643200 bytes (Ray's minimum)")
    _validate_engine(v)
    if v["node_id"] is None:
        v["node_id"] = f"{role}-{v['node_ip_address'] or socket.gethostname()}"
    derived = v["state_dir"] is None
    if derived:
        v["state_dir"] = str(Path(environ_home()) / ".cache" / "llm-controller")
    # The head writes its epoch and Ray token there: a relative path would land
    # wherever the controller happens to be started (a checkout, for one).
    if not Path(v["state_dir"]).is_absolute():
        raise ConfigError(f"state-dir must be an absolute path, got {v['state_dir']!r}"
                          + (" (the default, from HOME)" if derived else ""))
    if "\x00" in v["state_dir"]:
        raise ConfigError(f"state-dir must not contain a NUL character, got {v['state_dir']!r}")
    return Config(**v)


def _validate_engine(v: dict[str, Any]) -> None:
    if v["engine_port"] != 0:
        _check_port("engine_port", v["engine_port"])
    if v["replicas"] < 0 or v["engine_restarts"] < 0:
        raise ConfigError("replicas and engine-restarts must be 0 or more")
    if v["role"] != "head" or v["engine"] == "none":
        v["mode"] = v["mode"] or "replicated"
        return
    gpus = local_gpu_count()
    if v["mode"] is None:
        v["mode"] = "sharded" if gpus else "replicated"
    if v["model"] is None:
        if gpus:
            raise ConfigError("--model is required on a machine with GPUs (a path or a hub id; "
                              "--model tiny serves the built-in test model)")
        v["model"] = "tiny"  # made on the spot: no model hub is needed
    if v["mode"] == "sharded":
        if v["replicas"] not in (0, 1):
            raise ConfigError(f"--replicas is for replicated mode; sharded mode runs one engine, got {v['replicas']}")
    elif v["replicas"] > 1 + v["expected_workers"]:
        raise ConfigError(f"--replicas {v['replicas']} is more than the cluster's nodes "
                          f"({1 + v['expected_workers']}): replicated mode runs at most one replica per node")
    elif v["tensor_parallel_size"] * v["pipeline_parallel_size"] > 1:
        raise ConfigError("--tensor-parallel-size and --pipeline-parallel-size are for --mode sharded")


def local_gpu_count(environ: dict[str, str] | None = None) -> int:
    """NVIDIA GPUs this machine shows (CUDA_VISIBLE_DEVICES narrows them), without importing torch."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0


def environ_home() -> str:
    return os.environ.get("HOME") or "/tmp"
