"""Settings from file, environment and flags; errors name the field and hide secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import DEFAULT_BASE_URL
from gateway.loader import SERVER_ENV, SOURCE_ENV, ConfigError, load_settings

WK1, AK1 = "wk_secret_one_1234", "ak_secret_one_5678"
WK2, AK2 = "wk_secret_two_1234", "ak_secret_two_5678"
TOKEN = "admin_secret_token_999"
SECRETS = (WK1, AK1, WK2, AK2, TOKEN)

ONE = f"""
port = 9000
data_dir = "/var/lib/gw"
admin_token = "{TOKEN}"

[[sources]]
write_key = "{WK1}"
accoil_api_key = "{AK1}"
name = "web"
rate_per_second = 20
"""

TWO = ONE + f"""
[[sources]]
write_key = "{WK2}"
accoil_api_key = "{AK2}"
api = "segment"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


def load(
    path: str | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> Any:
    return load_settings(config_path=path, env=env or {}, overrides=overrides)


def error(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, env, **overrides)
    message = info.value.message
    assert str(info.value) == message
    for secret in SECRETS:
        assert secret not in message
    return message


def test_file_only(tmp_path: Path) -> None:
    s = load(write(tmp_path, TWO))
    assert (s.port, s.data_dir, s.admin_token, s.host) == (9000, "/var/lib/gw", TOKEN, "127.0.0.1")
    assert [src.write_key for src in s.sources] == [WK1, WK2]
    web, second = s.sources
    assert (web.name, web.id, web.rate_per_second, web.api) == ("web", "web", 20.0, "v2")
    assert isinstance(web.rate_per_second, float)
    assert second.api == "segment"
    assert second.id.startswith("src_") and WK2 not in second.id
    # no caps unless set: the adaptive limit paces the source
    assert second.base_url == DEFAULT_BASE_URL and second.max_concurrency is None
    assert second.rate_per_second is None


def test_env_only_single_source() -> None:
    s = load(env={"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1, "UNRELATED": "x"})
    (src,) = s.sources
    assert (src.write_key, src.accoil_api_key, src.api, src.track_mode) == (WK1, AK1, "v2", "exact")
    assert (s.port, s.flush_interval, s.admin_token) == (8088, 2.0, None)


def test_env_converts_every_source_field() -> None:
    env = {
        "GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1,
        "ACCOIL_API": "segment", "ACCOIL_BASE_URL": "http://127.0.0.1:8089/",
        "ACCOIL_RATE_PER_SECOND": "200", "ACCOIL_MAX_CONCURRENCY": " 3 ",
        "ACCOIL_TRACK_MODE": "daily-unique", "ACCOIL_TIMEOUT": "2.5", "ACCOIL_NAME": "app",
        "ACCOIL_UNNAMED_PAGES": "title",
    }
    (src,) = load(env=env).sources
    assert src.unnamed_pages == "title"
    assert src.api == "segment"
    assert src.base_url == "http://127.0.0.1:8089"  # trailing slash dropped
    assert src.rate_per_second == 200.0 and isinstance(src.rate_per_second, float)
    assert src.max_concurrency == 3
    assert (src.track_mode, src.timeout, src.id) == ("daily-unique", 2.5, "app")


def test_env_converts_server_fields() -> None:
    env = {
        "GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1, "GATEWAY_PORT": "8100",
        "GATEWAY_DATA_DIR": "/tmp/x", "GATEWAY_FLUSH_INTERVAL": "0.25",
        "GATEWAY_MAX_BACKLOG": "1000", "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_ADMIN_TOKEN": TOKEN, "GATEWAY_FSYNC": "full", "GATEWAY_LOG_LEVEL": "WARN",
        "GATEWAY_DEAD_LETTER_RETENTION": "86400",
    }
    s = load(env=env)
    assert s.dead_letter_retention == 86400.0
    assert (s.port, s.data_dir, s.flush_interval, s.max_backlog) == (8100, "/tmp/x", 0.25, 1000)
    assert (s.log_format, s.admin_token, s.fsync, s.log_level) == ("json", TOKEN, "full", "warning")


def test_every_field_has_an_env_var() -> None:
    assert SOURCE_ENV["GATEWAY_WRITE_KEY"] == "write_key"
    assert SOURCE_ENV["ACCOIL_API_KEY"] == "accoil_api_key"
    assert SOURCE_ENV["ACCOIL_RATE_PER_SECOND"] == "rate_per_second"
    assert SERVER_ENV["GATEWAY_ADMIN_TOKEN"] == "admin_token"
    assert "GATEWAY_SOURCES" not in SERVER_ENV


def test_empty_env_var_counts_as_unset(tmp_path: Path) -> None:
    s = load(write(tmp_path, ONE), {"GATEWAY_PORT": "", "ACCOIL_API": ""})
    assert s.port == 9000 and s.sources[0].api == "v2"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, ONE)
    env = {"GATEWAY_PORT": "9100", "GATEWAY_DATA_DIR": "/env", "GATEWAY_FLUSH_INTERVAL": "3"}
    s = load(path, env, port=9200, host=None, flush_interval=None)
    assert s.port == 9200  # flag beats env and file
    assert s.data_dir == "/env"  # env beats file
    assert s.flush_interval == 3.0
    assert s.admin_token == TOKEN  # file beats default
    assert s.host == "127.0.0.1"  # default; None flag is "not given"


def test_env_overrides_the_single_file_source(tmp_path: Path) -> None:
    env = {"ACCOIL_RATE_PER_SECOND": "7", "ACCOIL_API_KEY": AK2, "ACCOIL_BASE_URL": "http://h:1"}
    (src,) = load(write(tmp_path, ONE), env).sources
    assert (src.write_key, src.accoil_api_key, src.name) == (WK1, AK2, "web")
    assert (src.rate_per_second, src.base_url) == (7.0, "http://h:1")


def test_env_source_vars_with_several_file_sources_are_an_error(tmp_path: Path) -> None:
    msg = error(write(tmp_path, TWO), {"ACCOIL_TRACK_MODE": "exact", "ACCOIL_API_KEY": AK2})
    assert msg.startswith("ACCOIL_API_KEY, ACCOIL_TRACK_MODE:")
    assert "2 sources" in msg and "[[sources]]" in msg


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("GATEWAY_PORT", "abc", 'GATEWAY_PORT: expected an integer, got "abc"'),
        ("GATEWAY_PORT", "80.5", 'GATEWAY_PORT: expected an integer, got "80.5"'),
        ("GATEWAY_PORT", "70000", "GATEWAY_PORT: Expected int <= 65535, got 70000"),
        ("GATEWAY_FLUSH_INTERVAL", "soon", 'GATEWAY_FLUSH_INTERVAL: expected a number, got "soon"'),
        ("GATEWAY_FLUSH_INTERVAL", "0", "GATEWAY_FLUSH_INTERVAL: Expected float > 0.0, got 0.0"),
        ("GATEWAY_MAX_BACKLOG", "-5", "GATEWAY_MAX_BACKLOG: Expected int >= 1, got -5"),
        ("GATEWAY_LOG_FORMAT", "xml", 'GATEWAY_LOG_FORMAT: expected one of "auto", "console", "json", got "xml"'),
        ("GATEWAY_LOG_LEVEL", "loud", 'GATEWAY_LOG_LEVEL: expected one of debug, info, warning, error, critical, got "loud"'),
        ("ACCOIL_RATE_PER_SECOND", "-3", "ACCOIL_RATE_PER_SECOND: Expected float > 0.0, got -3.0"),
        ("ACCOIL_RATE_PER_SECOND", "fast", 'ACCOIL_RATE_PER_SECOND: expected a number, got "fast"'),
        ("ACCOIL_RATE_PER_SECOND", "inf", 'ACCOIL_RATE_PER_SECOND: expected a finite number, got "inf"'),
        ("ACCOIL_MAX_CONCURRENCY", "0", "ACCOIL_MAX_CONCURRENCY: Expected int >= 1, got 0"),
        ("ACCOIL_MAX_CONCURRENCY", "2.5", 'ACCOIL_MAX_CONCURRENCY: expected an integer, got "2.5"'),
        ("ACCOIL_MAX_CONCURRENCY", "9999", "ACCOIL_MAX_CONCURRENCY: Expected int <= 4096, got 9999"),
        ("ACCOIL_TIMEOUT", "nan", 'ACCOIL_TIMEOUT: expected a finite number, got "nan"'),
        ("ACCOIL_API", "v3", 'ACCOIL_API: expected one of "segment", "v2", got "v3"'),
        ("ACCOIL_TRACK_MODE", "daily", 'ACCOIL_TRACK_MODE: expected one of "daily-unique", "exact", got "daily"'),
        ("ACCOIL_UNNAMED_PAGES", "name", 'ACCOIL_UNNAMED_PAGES: expected one of "path", "skip", "title", got "name"'),
        ("GATEWAY_DEAD_LETTER_RETENTION", "0", "GATEWAY_DEAD_LETTER_RETENTION: Expected float > 0.0, got 0.0"),
        ("ACCOIL_BASE_URL", "in.accoil.com", 'ACCOIL_BASE_URL: expected an http:// or https:// URL, got "in.accoil.com"'),
    ],
)
def test_env_errors_name_the_variable(var: str, value: str, expected: str) -> None:
    assert error(env={"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1, var: value}) == expected


def test_kubernetes_service_link_gets_a_hint() -> None:
    msg = error(env={"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1,
                     "GATEWAY_PORT": "tcp://10.0.0.7:8088"})
    assert msg.startswith('GATEWAY_PORT: expected an integer, got "tcp://10.0.0.7:8088"')
    assert "enableServiceLinks" in msg


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ACCOIL_API_KEY": AK1}, "GATEWAY_WRITE_KEY: not set"),
        ({"GATEWAY_WRITE_KEY": WK1}, "ACCOIL_API_KEY: not set"),
        ({"ACCOIL_RATE_PER_SECOND": "5"}, "GATEWAY_WRITE_KEY: not set"),
        ({"ACCOIL_WRITE_KEY": WK1}, "ACCOIL_WRITE_KEY: not a setting; did you mean GATEWAY_WRITE_KEY?"),
        ({}, "sources: no source configured"),
    ],
)
def test_env_source_incomplete(env: dict[str, str], expected: str) -> None:
    assert error(env=env).startswith(expected)


def test_secret_env_values_never_echoed() -> None:
    msg = error(env={"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": " " + AK1})
    assert msg == "ACCOIL_API_KEY: has leading or trailing whitespace"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TWO.replace("rate_per_second = 20", "rate_per_second = -3"),
         "sources[0].rate_per_second: Expected float > 0.0, got -3"),
        (TWO + "max_concurrency = 0\n", "sources[1].max_concurrency: Expected int >= 1, got 0"),
        (TWO + 'max_concurrency = "8"\n', "sources[1].max_concurrency: Expected int, got str"),
        (TWO + "max_concurrency = 5000\n",
         "sources[1].max_concurrency: Expected int <= 4096, got 5000"),
        (TWO + "rate_per_second = 0\n", "sources[1].rate_per_second: Expected float > 0.0, got 0"),
        (TWO + "rate_per_second = nan\n", "sources[1].rate_per_second: Expected float > 0.0, got NaN"),
        (TWO + "rate_per_second = inf\n",
         "sources[1].rate_per_second: expected a finite number, got inf"),
        (TWO + "timeout = inf\n", "sources[1].timeout: expected a finite number, got inf"),
        (TWO + 'track_mode = "daily"\n', 'sources[1].track_mode: expected one of "daily-unique", "exact", got "daily"'),
        (TWO + 'unnamed_pages = "url"\n', 'sources[1].unnamed_pages: expected one of "path", "skip", "title", got "url"'),
        (TWO + 'base_url = "ftp://x"\n', 'sources[1].base_url: expected an http:// or https:// URL, got "ftp://x"'),
        (ONE.replace("port = 9000", "port = 99999"), "port: Expected int <= 65535, got 99999"),
        (ONE.replace("port = 9000", "port = true"), "port: Expected int, got bool"),
        (ONE.replace("port = 9000", 'fsync = "always"'), 'fsync: expected one of "full", "normal", "off", got "always"'),
        (ONE.replace("port = 9000", "retry_base = 10\nretry_max = 5"),
         "retry_max: must be at least retry_base (10), got 5"),
        (ONE.replace("port = 9000", 'host = ""'), "host: must not be empty (127.0.0.1 is the sidecar default)"),
    ],
)
def test_file_errors_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    assert error(write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ONE.replace("port = 9000", "prot = 9000"), "prot: unknown key (did you mean port?)"),
        (ONE.replace("port = 9000", "[server]\nport = 9000"),
         "server: unknown key; server settings go at the top of the file, not in a table"),
        (ONE.replace("port = 9000", f'write_key = "{WK2}"'),
         "write_key: unknown key; source fields belong in a [[sources]] table"),
        (ONE + "rate_per_secnd = 5\n", "sources[0].rate_per_secnd: unknown key (did you mean rate_per_second?)"),
        (ONE + "flush_interval = 5\n",
         "sources[0].flush_interval: unknown key; flush_interval is a server setting, "
         "put it at the top of the file before the first [[sources]] table"),
        (f'[sources]\nwrite_key = "{WK1}"\n',
         "sources: expected an array of tables ([[sources]]), got a single table"),
        ("sources = [1]\n", "sources[0]: expected a table"),
        ("port = 1\n", "sources: no source configured; add a [[sources]] table to the config "
         "file, or set GATEWAY_WRITE_KEY and ACCOIL_API_KEY"),
    ],
)
def test_file_structure_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert error(write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TWO.replace(WK2, WK1),
         "sources[1].write_key: same write key as sources[0]; each source needs its own write key"),
        (TWO.replace('api = "segment"', 'name = "web"'),
         'sources[1].name: source id "web" is also used by sources[0]; source names must be unique'),
        (ONE.replace(f'accoil_api_key = "{AK1}"', ""), "sources[0].accoil_api_key: missing (required)"),
        (ONE.replace(f'write_key = "{WK1}"', 'write_key = ""'),
         "sources[0].write_key: Expected str of length >= 1"),
        (ONE.replace(f'accoil_api_key = "{AK1}"', f'accoil_api_key = "{AK1}\\n"'),
         "sources[0].accoil_api_key: has leading or trailing whitespace"),
        (ONE.replace(f'write_key = "{WK1}"', "write_key = 1234"), "sources[0].write_key: Expected str, got int"),
        (ONE.replace(f'admin_token = "{TOKEN}"', 'admin_token = ""'),
         "admin_token: empty; remove it to turn the admin routes off"),
        (ONE.replace('name = "web"', f'api = "{AK1}"'), 'sources[0].api: expected one of "segment", "v2", got "***"'),
    ],
)
def test_secret_fields_errors_hide_values(tmp_path: Path, text: str, expected: str) -> None:
    assert error(write(tmp_path, text)) == expected


def test_unreadable_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert error(missing) == f"config file {missing}: not found"
    assert error(str(tmp_path)).startswith(f"config file {tmp_path}: cannot read it")
    msg = error(write(tmp_path, f'[[sources]]\nwrite_key = "{WK1}\naccoil_api_key = 1\n'))
    assert msg.startswith(f"config file {tmp_path / 'gateway.toml'}: invalid TOML: ")
    assert "line 2" in msg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"port": 70000}, "--port: Expected int <= 65535, got 70000"),
        ({"flush_interval": -1.0}, "--flush-interval: Expected float > 0.0, got -1.0"),
        ({"log_format": "xml"}, '--log-format: expected one of "auto", "console", "json", got "xml"'),
        ({"sources": []}, "--sources: not a server setting"),
    ],
)
def test_flag_errors_name_the_flag(overrides: dict[str, Any], expected: str) -> None:
    assert error(None, {"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1}, **overrides) == expected


def test_range_error_on_env_value_that_overrides_file(tmp_path: Path) -> None:
    assert error(write(tmp_path, ONE), {"ACCOIL_TIMEOUT": "-1"}) == (
        "ACCOIL_TIMEOUT: Expected float > 0.0, got -1.0"
    )


def test_operations_doc_lists_every_field_and_variable() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for var, name in {**SERVER_ENV, **SOURCE_ENV}.items():
        assert f"| `{name}` |" in doc, name
        assert f"`{var}`" in doc, var


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (ONE.replace(WK1, "w"), {},
         "sources[0].write_key: too short (1 characters); secrets need at least 8"),
        (ONE.replace(AK1, "ak_1234"), {},
         "sources[0].accoil_api_key: too short (7 characters); secrets need at least 8"),
        (ONE.replace(AK1, "STG_abcd123"), {},
         "sources[0].accoil_api_key: too short (without its stg_ prefix, 7 characters); "
         "secrets need at least 8"),
        (ONE.replace(TOKEN, "tok"), {},
         "admin_token: too short (3 characters); secrets need at least 8"),
        (None, {"GATEWAY_WRITE_KEY": "x", "ACCOIL_API_KEY": AK1},
         "GATEWAY_WRITE_KEY: too short (1 characters); secrets need at least 8"),
        (None, {"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1, "GATEWAY_ADMIN_TOKEN": "short"},
         "GATEWAY_ADMIN_TOKEN: too short (5 characters); secrets need at least 8"),
    ],
)
def test_short_secrets_are_refused_by_name(
    tmp_path: Path, text: str | None, env: dict[str, str], expected: str
) -> None:
    # a one-letter key would be masked as "***" wherever that letter appears in a log line
    path = write(tmp_path, text) if text is not None else None
    assert error(path, env) == expected


def test_a_short_secret_echoed_as_a_value_is_still_masked(tmp_path: Path) -> None:
    text = ONE.replace(AK1, "k1").replace('name = "web"', 'api = "k1"')
    assert error(write(tmp_path, text)) == (
        'sources[0].api: expected one of "segment", "v2", got "***"'
    )


def test_eight_character_secrets_are_enough() -> None:
    env = {"GATEWAY_WRITE_KEY": "wk_12345", "ACCOIL_API_KEY": "stg_abcd1234",
           "GATEWAY_ADMIN_TOKEN": "12345678"}
    settings = load(None, env)
    assert settings.sources[0].write_key == "wk_12345"
    assert settings.admin_token == "12345678"


REDIS_ENV = {"GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1}


def test_redis_settings_from_env() -> None:
    s = load(env={**REDIS_ENV, "GATEWAY_STORE": "redis",
                  "GATEWAY_REDIS_URL": "redis://10.0.0.5:6380/2",
                  "GATEWAY_PARTITIONS": "128", "GATEWAY_REDIS_WAIT_REPLICAS": "1"})
    assert (s.store, s.redis_url, s.partitions, s.redis_wait_replicas) == (
        "redis", "redis://10.0.0.5:6380/2", 128, 1)


def test_redis_defaults() -> None:
    s = load(env=REDIS_ENV)
    assert (s.store, s.redis_url, s.partitions, s.redis_wait_replicas) == ("sqlite", None, 64, 0)


PASSWORD = "redis_pass_word_77"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_STORE": "redis"},
         'redis_url: required with store = "redis"; set redis_url or GATEWAY_REDIS_URL '
         "(redis://host:6379/0, rediss:// for TLS, unix:///path/redis.sock)"),
        ({"GATEWAY_STORE": "mongo"},
         'GATEWAY_STORE: expected one of "redis", "sqlite", got "mongo"'),
        ({"GATEWAY_REDIS_URL": "redis://h:6379"},
         'GATEWAY_REDIS_URL: set, but store is "sqlite"; set store = "redis" '
         "(GATEWAY_STORE=redis) to use it, or remove it"),
        ({"GATEWAY_REDIS_WAIT_REPLICAS": "1"},
         'GATEWAY_REDIS_WAIT_REPLICAS: only applies with store = "redis"'),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": f"http://:{PASSWORD}@h:6379"},
         'GATEWAY_REDIS_URL: expected a redis://, rediss:// or unix:// URL, got the scheme "http"'),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": f"redis://:{PASSWORD}@h:99999"},
         "GATEWAY_REDIS_URL: the port is not a number from 0 to 65535"),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": f"redis://:{PASSWORD}@h:6379/cache"},
         'GATEWAY_REDIS_URL: the path must be a database number (/0), got "cache"'),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": f"redis://:{PASSWORD}@:6379"},
         "GATEWAY_REDIS_URL: no host (redis://host:6379/0)"),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": "unix://"},
         "GATEWAY_REDIS_URL: a unix:// URL needs a socket path"),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": "redis://h", "GATEWAY_PARTITIONS": "0"},
         "GATEWAY_PARTITIONS: Expected int >= 1, got 0"),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": "redis://h",
          "GATEWAY_PARTITIONS": "20000"},
         "GATEWAY_PARTITIONS: Expected int <= 16384, got 20000"),
        ({"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": "redis://h",
          "GATEWAY_REDIS_WAIT_REPLICAS": "-1"},
         "GATEWAY_REDIS_WAIT_REPLICAS: Expected int >= 0, got -1"),
    ],
)
def test_redis_errors_name_the_field_and_hide_the_password(
    env: dict[str, str], expected: str
) -> None:
    message = error(env={**REDIS_ENV, **env})
    assert message == expected
    assert PASSWORD not in message


def test_redis_errors_in_the_file_name_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, f'store = "redis"\nredis_url = "redis://:{PASSWORD}@h:1/x"\n' + ONE)
    message = error(path)
    assert message == 'redis_url: the path must be a database number (/0), got "x"'
    assert error(write(tmp_path, 'partitions = "many"\n' + ONE)) == (
        'partitions: Expected int, got str')


def test_redis_url_shown_without_credentials() -> None:
    from gateway.loader import redis_secrets, shown_url

    url = f"rediss://app:{PASSWORD}@redis.internal:6380/1"
    assert shown_url(url) == "rediss://redis.internal:6380/1"
    assert redis_secrets(url) == (PASSWORD, "app")
    assert shown_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_redis_password_is_masked_in_logs() -> None:
    from gateway.observability.logging import Redactor

    s = load(env={**REDIS_ENV, "GATEWAY_STORE": "redis",
                  "GATEWAY_REDIS_URL": f"redis://:{PASSWORD}@h:6379/0"})
    assert PASSWORD not in Redactor.from_settings(s).mask(f"error connecting with {PASSWORD}")
