"""Build `Settings` from a TOML file, the environment and command-line flags.

Precedence, highest first: flags (`overrides`) > environment > file > defaults.

- File: top-level keys are server settings; each `[[sources]]` table is one source.
- Environment: every server field `x` is `GATEWAY_X` (`GATEWAY_PORT`, `GATEWAY_ADMIN_TOKEN`).
  Source fields are `ACCOIL_X` (`ACCOIL_API`, `ACCOIL_RATE_PER_SECOND`), except the two keys:
  `GATEWAY_WRITE_KEY` and `ACCOIL_API_KEY`. They describe one source: with no file (or a
  file without sources) they define it; with a file holding exactly one source they override
  its fields; with several sources they are an error, since it is not clear which one they mean.
  An empty variable counts as unset, so `GATEWAY_PORT=` in a compose file changes nothing.
- Flags: `overrides` maps server field names to values; `None` means "flag not given".

Every error is a `ConfigError` whose message starts with where the bad value came from:
the field path for the file (`sources[1].rate_per_second`), the variable for the
environment (`GATEWAY_PORT`), the flag for flags (`--port`). Messages never contain the
value of a write key, an API key or the admin token.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi

from gateway.config import Settings, Source

# Fields whose values are secrets: never echoed in an error message.
MIN_SECRET = 8  # characters in a write key, API key or admin token
SECRET_FIELDS = frozenset({"write_key", "accoil_api_key", "admin_token", "redis_url"})

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")



def _field_types(cls: type[msgspec.Struct]) -> dict[str, mi.Type]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return {f.name: f.type for f in info.fields}


_SERVER_TYPES = {k: v for k, v in _field_types(Settings).items() if k != "sources"}
_SOURCE_TYPES = _field_types(Source)

# Environment variable -> field, for the one source the environment can describe.
SOURCE_ENV: dict[str, str] = {
    ("GATEWAY_WRITE_KEY" if name == "write_key" else
     "ACCOIL_API_KEY" if name == "accoil_api_key" else
     "ACCOIL_" + name.upper()): name
    for name in _SOURCE_TYPES
}
SERVER_ENV: dict[str, str] = {"GATEWAY_" + name.upper(): name for name in _SERVER_TYPES}

# Names the ACCOIL_ + field rule would suggest but that are spelled otherwise: being
# silently ignored would be worse than an error.
_MISNAMED_ENV = {"ACCOIL_WRITE_KEY": "GATEWAY_WRITE_KEY", "ACCOIL_ACCOIL_API_KEY": "ACCOIL_API_KEY"}

_MSGSPEC_ERROR = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


class ConfigError(Exception):
    """A configuration problem; `message` names the field and never holds a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def load_settings(
    *, config_path: str | None, env: Mapping[str, str], overrides: dict[str, Any]
) -> Settings:
    raw: dict[str, Any] = _read_file(config_path) if config_path is not None else {}
    # where each value that did not come from the file came from, by field path
    origins: dict[str, str] = {}
    secrets: set[str] = set()
    _apply_env(raw, env, origins)
    _apply_overrides(raw, overrides, origins)
    _collect_secrets(raw, secrets)
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_scrub(_explain(str(exc), raw, origins), secrets)) from None
    try:
        _check(settings, origins)
    except ConfigError as exc:
        raise ConfigError(_scrub(exc.message, secrets)) from None
    return settings


# -- file ------------------------------------------------------------------------------


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib messages give line and column, never the text around them
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    _check_keys(raw)
    return raw


def _check_keys(raw: dict[str, Any]) -> None:
    for key, value in raw.items():
        if key == "sources" or key in _SERVER_TYPES:
            continue
        if key in _SOURCE_TYPES:
            hint = "; source fields belong in a [[sources]] table"
        elif isinstance(value, dict):
            hint = "; server settings go at the top of the file, not in a table"
        else:
            hint = _did_you_mean(key, _SERVER_TYPES)
        raise ConfigError(f"{key}: unknown key{hint}")
    sources = raw.get("sources", [])
    if not isinstance(sources, list):
        raise ConfigError("sources: expected an array of tables ([[sources]]), got a single table")
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            raise ConfigError(f"sources[{i}]: expected a table")
        for key in src:
            if key in _SOURCE_TYPES:
                continue
            if key in _SERVER_TYPES:
                # the classic TOML slip: a top-level key written after a [[sources]] header
                hint = (f"; {key} is a server setting, put it at the top of the file"
                        " before the first [[sources]] table")
            else:
                hint = _did_you_mean(key, _SOURCE_TYPES)
            raise ConfigError(f"sources[{i}].{key}: unknown key{hint}")


def _did_you_mean(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# -- environment and flags ---------------------------------------------------------------


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]) -> None:
    for var, right in _MISNAMED_ENV.items():
        if env.get(var):
            raise ConfigError(f"{var}: not a setting; did you mean {right}?")
    for var, name in SERVER_ENV.items():
        value = env.get(var)
        if value:
            raw[name] = _parse_env(var, value, _SERVER_TYPES[name], secret=name in SECRET_FIELDS)
            origins[name] = var

    present = {var: env[var] for var in SOURCE_ENV if env.get(var)}
    if not present:
        return
    sources = raw.setdefault("sources", [])
    if len(sources) > 1:
        names = ", ".join(sorted(present))
        raise ConfigError(
            f"{names}: source settings from the environment apply to a single source, but the "
            f"config file defines {len(sources)} sources; set these fields in their [[sources]] tables"
        )
    if not sources:
        sources.append({})
        for var in ("GATEWAY_WRITE_KEY", "ACCOIL_API_KEY"):
            if var not in present:
                raise ConfigError(
                    f"{var}: not set; a source defined by the environment needs both "
                    "GATEWAY_WRITE_KEY and ACCOIL_API_KEY"
                )
    source = sources[0]
    for var, value in present.items():
        name = SOURCE_ENV[var]
        source[name] = _parse_env(var, value, _SOURCE_TYPES[name], secret=name in SECRET_FIELDS)
        origins[f"sources[0].{name}"] = var


def _parse_env(var: str, value: str, typ: mi.Type, *, secret: bool) -> Any:
    """Turn a variable's text into the field's type; range checks are left to msgspec."""
    if isinstance(typ, mi.UnionType):
        # `str | None`: a set variable is the string
        typ = next(t for t in typ.types if not isinstance(t, mi.NoneType))
    shown = "a value" if secret else json.dumps(value)
    text = value.strip()
    if isinstance(typ, mi.IntType):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(
                f"{var}: expected an integer, got {shown}{_k8s_hint(var, value)}"
            ) from None
    if isinstance(typ, mi.FloatType):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{var}: expected a number, got {shown}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{var}: expected a finite number, got {shown}")
        return number
    if isinstance(typ, mi.BoolType):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}: expected true or false, got {shown}")
    if isinstance(typ, mi.LiteralType):
        if value not in typ.values:
            choices = ", ".join(json.dumps(v) for v in typ.values)
            raise ConfigError(f"{var}: expected one of {choices}, got {shown}")
        return value
    return value


def _k8s_hint(var: str, value: str) -> str:
    # Kubernetes service links set GATEWAY_PORT=tcp://... for a Service named "gateway".
    if value.startswith("tcp://"):
        return (" (this looks like a Kubernetes service link; set enableServiceLinks: false"
                " or use --port)")
    return ""


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], origins: dict[str, str]) -> None:
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if name not in _SERVER_TYPES:
            raise ConfigError(f"{flag}: not a server setting")
        if value is None:
            continue
        raw[name] = value
        origins[name] = flag


# -- validation ---------------------------------------------------------------------------


def _explain(error: str, raw: dict[str, Any], origins: dict[str, str]) -> str:
    """Rewrite a msgspec error as `<where>: <what>, got <value>`."""
    m = _MSGSPEC_ERROR.match(error)
    assert m is not None  # the pattern matches any string
    # an optional field is left out to unset it (TOML has no null), so "int | null" would
    # only puzzle: name the type the value should have
    msg, path = m["msg"].replace("`", "").replace(" | null", ""), (m["path"] or "").lstrip(".")
    missing = re.match(r"Object missing required field (\w+)", msg)
    unknown = re.match(r"Object contains unknown field (\w+)", msg)
    if missing:
        path, msg = _join(path, missing[1]), "missing (required)"
    elif unknown:
        path, msg = _join(path, unknown[1]), "unknown key"
    elif msg.startswith("Invalid enum value"):
        msg = f"expected one of {_choices(path)}, got {_show(_lookup(raw, path)[1])}"
    elif ", got " not in msg and path.rsplit(".", 1)[-1] not in SECRET_FIELDS:
        found, value = _lookup(raw, path)
        if found:
            msg += f", got {_show(value)}"
    return f"{origins.get(path, path)}: {msg}"


def _choices(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    typ = (_SOURCE_TYPES if path.startswith("sources[") else _SERVER_TYPES).get(name)
    values = typ.values if isinstance(typ, mi.LiteralType) else ()
    return ", ".join(json.dumps(v) for v in values)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _lookup(raw: Any, path: str) -> tuple[bool, Any]:
    node = raw
    for name, index in _PATH_PART.findall("." + path):
        try:
            node = node[int(index)] if index else node[name]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def _show(value: Any) -> str:
    if isinstance(value, bool | int | float | str) or value is None:
        return json.dumps(value)
    return type(value).__name__


def _check(settings: Settings, origins: dict[str, str]) -> None:
    def where(path: str) -> str:
        return origins.get(path, path)

    if not settings.sources:
        raise ConfigError(
            "sources: no source configured; add a [[sources]] table to the config file, "
            "or set GATEWAY_WRITE_KEY and ACCOIL_API_KEY"
        )
    _check_finite(settings, "", where)
    if not settings.host:
        raise ConfigError(f"{where('host')}: must not be empty (127.0.0.1 is the sidecar default)")
    level = settings.log_level.lower()
    level = "warning" if level == "warn" else level
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"{where('log_level')}: expected one of {', '.join(LOG_LEVELS)}, "
            f"got {json.dumps(settings.log_level)}"
        )
    settings.log_level = level
    if settings.retry_base > settings.retry_max:
        raise ConfigError(
            f"{where('retry_max')}: must be at least retry_base ({settings.retry_base:g}), "
            f"got {settings.retry_max:g}"
        )
    if settings.admin_token is not None:
        if not settings.admin_token:
            raise ConfigError(
                f"{where('admin_token')}: empty; remove it to turn the admin routes off"
            )
        _check_secret(settings.admin_token, where("admin_token"))

    by_key: dict[str, int] = {}
    by_id: dict[str, int] = {}
    for i, src in enumerate(settings.sources):
        _check_finite(src, f"sources[{i}].", where)
        _check_secret(src.write_key, where(f"sources[{i}].write_key"))
        _check_secret(src.accoil_api_key, where(f"sources[{i}].accoil_api_key"))
        if src.write_key in by_key:
            raise ConfigError(
                f"{where(f'sources[{i}].write_key')}: same write key as "
                f"sources[{by_key[src.write_key]}]; each source needs its own write key"
            )
        by_key[src.write_key] = i
        if src.id in by_id:
            raise ConfigError(
                f"{where(f'sources[{i}].name')}: source id {json.dumps(src.id)} is also used by "
                f"sources[{by_id[src.id]}]; source names must be unique"
            )
        by_id[src.id] = i
        url = urlsplit(src.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"{where(f'sources[{i}].base_url')}: expected an http:// or https:// URL, "
                f"got {json.dumps(src.base_url)}"
            )
        # forwarders append "/v2/track" etc.; a trailing slash would double it
        src.base_url = src.base_url.rstrip("/")
    _check_redis(settings, where)


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_redis(settings: Settings, where: Callable[[str], str]) -> None:
    """The Redis fields: required together, and never echoed (the URL may hold a password)."""
    url = settings.redis_url
    if settings.store != "redis":
        # set and silently unused would leave a user believing the gateways share a Redis
        if url is not None:
            raise ConfigError(
                f"{where('redis_url')}: set, but store is {json.dumps(settings.store)}; "
                'set store = "redis" (GATEWAY_STORE=redis) to use it, or remove it'
            )
        if settings.redis_wait_replicas:
            raise ConfigError(
                f"{where('redis_wait_replicas')}: only applies with store = \"redis\""
            )
        return
    if not url:
        raise ConfigError(
            f"{where('redis_url')}: required with store = \"redis\"; set redis_url or "
            "GATEWAY_REDIS_URL (redis://host:6379/0, rediss:// for TLS, unix:///path/redis.sock)"
        )
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"{where('redis_url')}: expected a redis://, rediss:// or unix:// URL, "
            f"got the scheme {json.dumps(parts.scheme)}"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where('redis_url')}: a unix:// URL needs a socket path")
        return
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ConfigError(f"{where('redis_url')}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ConfigError(f"{where('redis_url')}: no host (redis://host:6379/0)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(
            f"{where('redis_url')}: the path must be a database number (/0), got {json.dumps(db)}"
        )


def _check_finite(obj: msgspec.Struct, prefix: str, where: Callable[[str], str]) -> None:
    # TOML allows inf and nan, and "> 0" lets inf through
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where(prefix + name)}: expected a finite number, got {value}")


def _check_secret(secret: str, where: str) -> None:
    if secret != secret.strip():
        raise ConfigError(f"{where}: has leading or trailing whitespace")
    # Every secret is masked wherever it appears in logs and replies: a short one would mask
    # ordinary text (a one-letter key, that letter everywhere) and is guessable besides. A
    # staging key travels without its `stg_` prefix, so the rest must be long enough too.
    bare = secret[4:] if secret[:4].lower() == "stg_" else secret
    if len(bare) < MIN_SECRET:
        what = "without its stg_ prefix, " if bare is not secret else ""
        raise ConfigError(
            f"{where}: too short ({what}{len(bare)} characters); "
            f"secrets need at least {MIN_SECRET}"
        )


def _collect_secrets(raw: dict[str, Any], secrets: set[str]) -> None:
    token = raw.get("admin_token")
    if isinstance(token, str) and token:
        secrets.add(token)
    url = raw.get("redis_url")
    if isinstance(url, str):
        secrets.update(p for p in redis_secrets(url) if p)
    sources = raw.get("sources")
    for src in sources if isinstance(sources, list) else ():
        if isinstance(src, dict):
            for name in ("write_key", "accoil_api_key"):
                value = src.get(name)
                if isinstance(value, str) and value:
                    secrets.add(value)


def redis_secrets(url: str) -> tuple[str, ...]:
    """The user and password a Redis URL carries (ACL user names are kept out of logs too)."""
    try:
        parts = urlsplit(url)
        return tuple(p for p in (parts.password, parts.username) if p)
    except ValueError:
        return ()


def shown_url(url: str) -> str:
    """A Redis URL as logs and messages may show it: without its user and password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _scrub(message: str, secrets: set[str]) -> str:
    # Belt and braces: no path above echoes a secret, but a future msgspec message might.
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET:
            message = message.replace(secret, "***")
        else:
            # too short to be refused anywhere but as a whole value: masked everywhere, a
            # one-letter key would blot that letter out of the message that refuses it
            message = message.replace(json.dumps(secret), '"***"')
    return message
