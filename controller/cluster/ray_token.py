"""Ray token authentication: on by default, one token per cluster.

Ray (2.5x+) checks a bearer token on every GCS and raylet call when
RAY_AUTH_MODE=token; the token comes from RAY_AUTH_TOKEN or the file named by
RAY_AUTH_TOKEN_PATH. The controller sets both variables in its own process
before anything starts, so `ray start`, its driver (`ray.init`), the
`ray health-check` runs and the engines it launches all present the token.

Where the token comes from, first match wins:
- `--ray-token-file PATH` (a Kubernetes Secret mounted as a file, a file copied
  to each machine);
- `LLMCTL_RAY_TOKEN` in the environment (a Secret as an environment variable);
- on the head only: `STATE_DIR/ray-auth-token`, made on first start (random,
  mode 0600) and reused afterwards, so a restarted head controller keeps
  talking to its live Ray head. Workers then need that file's content.

`resolve()` only decides: it reads a given token file but writes nothing, so
loading or printing a configuration leaves no file behind. The head's own file
is made by `ensure_head_token()`, which `main()` runs once the node really
starts, right before `apply()`.

A worker without a token is a configuration error (exit 2); a worker with a
wrong one is refused by Ray, and the controller says so and does not retry.
`--ray-auth none` turns it off (RAY_AUTH_MODE=disabled, set explicitly so that
a stray ~/.ray/auth_token does not turn it on behind our back).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from controller.config import Config, ConfigError

TOKEN_FILE_NAME = "ray-auth-token"
# Ray's own words when a call's token does not match (InvalidAuthToken, UNAUTHENTICATED).
REFUSED_MARKERS = ("InvalidAuthToken", "UNAUTHENTICATED", "Unauthenticated", "authentication token")


@dataclass(frozen=True)
class RayAuth:
    mode: str                  # "token" or "none"
    source: str                # where the token came from, for the log; never the token
    env: dict[str, str]        # what the controller's process (and so its children) gets
    head_token: str | None = None  # the head's own token file, made at start-up by ensure_head_token()


def head_token_path(state_dir: str) -> Path:
    return Path(state_dir) / TOKEN_FILE_NAME


def _read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"ray-token-file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"ray-token-file unreadable: {path}: {exc}") from None
    if not token:
        raise ConfigError(f"ray-token-file is empty: {path}")
    return token


def resolve(config: Config) -> RayAuth:
    """Decide the Ray auth settings for this node; ConfigError when a worker has no token."""
    if config.ray_auth == "none":
        return RayAuth("none", "--ray-auth none", {"RAY_AUTH_MODE": "disabled"})
    if config.ray_token_file:
        _read_token_file(config.ray_token_file)
        path = str(Path(config.ray_token_file).resolve())
        return RayAuth("token", f"file {path}", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path})
    if config.ray_token:
        return RayAuth("token", "environment LLMCTL_RAY_TOKEN",
                       {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": config.ray_token.strip()})
    if config.role == "head":
        path = str(head_token_path(config.state_dir))  # the state dir is absolute (config validation)
        return RayAuth("token", f"file {path} (the head's own)",
                       {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}, head_token=path)
    raise ConfigError(
        "a worker needs the cluster's Ray token: --ray-token-file PATH or LLMCTL_RAY_TOKEN "
        f"(the head keeps it in its state dir, {TOKEN_FILE_NAME}); or --ray-auth none on every node")


def ensure_head_token(auth: RayAuth) -> None:
    """The head's start-up step: make its own token file once (random, 0600, in a
    0700 folder), or check the one a previous start made; nothing for other sources.
    ConfigError when the file cannot be made or is unusable."""
    if auth.head_token is None:
        return
    path = Path(auth.head_token)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # FileExistsError too: the state dir is a file
        raise ConfigError(f"cannot make the state dir {path.parent}: {exc.strerror or exc}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by an earlier start: reused, so the live Ray head still accepts us
        _read_token_file(str(path))
        return
    except OSError as exc:
        raise ConfigError(f"cannot make the head's Ray token file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def apply(auth: RayAuth) -> None:
    """Set the Ray auth variables in this process: Ray and every child read them."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    os.environ.update(auth.env)


def is_refusal(text: str) -> bool:
    """Whether Ray's error text says the token was refused."""
    return any(marker in text for marker in REFUSED_MARKERS)
