"""Layered config loading: priority, type conversion, and one-line errors naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cloudmatrix.config import ConfigError, ServerConfig, load_config
from cloudmatrix.errors import FieldError

pytestmark = pytest.mark.timeout(30)

PREFIX = "CMX_TEST"


@dataclass(frozen=True)
class Inner:
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    names: tuple[str, ...] = ("a",)
    ids: tuple[int, ...] = ()
    note: str | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise FieldError("count", f"must be >= 0, got {self.count}")
        if self.ratio > 1:
            raise FieldError("ratio", f"must be <= 1, got {self.ratio}")


@dataclass(frozen=True)
class Outer:
    server: ServerConfig = field(default_factory=ServerConfig)
    inner: Inner = field(default_factory=lambda: Inner(count=7))
    model: str = "tiny"


def load(yaml_text: str | None = None, env: dict[str, str] | None = None,
         overrides: tuple[str, ...] = (), tmp_path=None) -> Outer:
    path = None
    if yaml_text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
    return load_config(Outer, path=str(path) if path else None, env=env or {},
                       overrides=overrides, env_prefix=PREFIX)


def error_of(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    return message


def test_defaults_include_default_factory_values():
    config = load()
    assert config == Outer()
    assert config.inner.count == 7
    assert config.server.port == 0 and config.server.host == "127.0.0.1"


@pytest.mark.parametrize("layers, expected", [
    ({}, 0),
    ({"yaml": 1001}, 1001),
    ({"yaml": 1001, "env": 1002}, 1002),
    ({"yaml": 1001, "env": 1002, "set": 1003}, 1003),
    ({"env": 1002, "set": 1003}, 1003),
    ({"yaml": 1001, "set": 1003}, 1003),
])
def test_priority_default_yaml_env_set(tmp_path, layers, expected):
    config = load(
        yaml_text=f"server:\n  port: {layers['yaml']}\n" if "yaml" in layers else None,
        env={f"{PREFIX}__SERVER__PORT": str(layers["env"])} if "env" in layers else None,
        overrides=(f"server.port={layers['set']}",) if "set" in layers else (),
        tmp_path=tmp_path,
    )
    assert config.server.port == expected


def test_layers_merge_field_by_field(tmp_path):
    config = load(yaml_text="server: {port: 1001, grace_s: 2}\ninner: {ratio: 0.25}\n",
                  env={f"{PREFIX}__SERVER__HOST": "0.0.0.0"}, overrides=("model=big",),
                  tmp_path=tmp_path)
    assert (config.server.port, config.server.grace_s, config.server.host) == (1001, 2.0, "0.0.0.0")
    assert (config.inner.ratio, config.inner.count, config.model) == (0.25, 7, "big")


def test_yaml_types_convert(tmp_path):
    config = load(yaml_text="inner:\n  names: [x, y]\n  ids: [3, 4]\n  enabled: yes\n"
                            "  note: hello\nserver:\n  trace_file: null\n", tmp_path=tmp_path)
    assert config.inner.names == ("x", "y") and config.inner.ids == (3, 4)
    assert config.inner.enabled is True and config.inner.note == "hello"
    assert config.server.trace_file is None


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False),
])
def test_bool_strings(text, expected):
    assert load(overrides=(f"inner.enabled={text}",)).inner.enabled is expected


def test_strings_convert_to_tuples_optionals_and_numbers():
    config = load(env={f"{PREFIX}__INNER__IDS": "1, 2,3", f"{PREFIX}__INNER__NAMES": "p,q",
                       f"{PREFIX}__INNER__RATIO": "1e-3", f"{PREFIX}__INNER__NOTE": "none"},
                  overrides=("server.otlp_endpoint=localhost:4317", "server.max_message_bytes=1024"))
    assert config.inner.ids == (1, 2, 3) and config.inner.names == ("p", "q")
    assert config.inner.ratio == pytest.approx(1e-3) and config.inner.note is None
    assert config.server.otlp_endpoint == "localhost:4317"
    assert config.server.max_message_bytes == 1024


def test_empty_string_is_empty_tuple():
    assert load(overrides=("inner.names=",)).inner.names == ()


def test_other_prefixes_are_ignored():
    env = {"CMX_TESTX__SERVER__PORT": "1", "CMX_TEST_SERVER_PORT": "2", "PATH": "/bin"}
    assert load(env=env).server.port == 0


def test_unknown_yaml_key_names_dotted_field(tmp_path):
    message = error_of(yaml_text="inner:\n  bogus: 1\n", tmp_path=tmp_path)
    assert message == "config error: inner.bogus: unknown key"


def test_unknown_env_key_names_dotted_field():
    assert "server.prot: unknown key" in error_of(env={f"{PREFIX}__SERVER__PROT": "1"})


def test_bad_int_names_dotted_field():
    message = error_of(env={f"{PREFIX}__SERVER__PORT": "abc"})
    assert message == "config error: server.port: expected int, got 'abc'"


def test_float_is_not_an_int(tmp_path):
    assert "server.port: expected int, got 1.5" in error_of(yaml_text="server: {port: 1.5}",
                                                           tmp_path=tmp_path)


def test_bad_bool_names_dotted_field():
    assert "inner.enabled: expected bool" in error_of(overrides=("inner.enabled=maybe",))


def test_bad_tuple_item_names_index():
    assert "inner.ids[1]: expected int, got 'x'" in error_of(overrides=("inner.ids=1,x",))


def test_failed_validation_names_dotted_field():
    message = error_of(overrides=("server.port=70000",))
    assert message == "config error: server.port: must be in [0, 65535], got 70000"
    assert "inner.count: must be >= 0" in error_of(overrides=("inner.count=-1",))
    assert "server.log_level: must be one of" in error_of(overrides=("server.log_level=LOUD",))
    assert error_of(overrides=("inner.ratio=2",)) == "config error: inner.ratio: must be <= 1, got 2.0"


def test_scalar_where_mapping_expected(tmp_path):
    assert "server: expected a mapping" in error_of(yaml_text="server: 5", tmp_path=tmp_path)


def test_malformed_override():
    assert "--set: expected KEY=VALUE" in error_of(overrides=("server.port",))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Outer, path=str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(Outer, path=str(bad))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, field_name", [
    ({"port": -1}, "port"), ({"metrics_port": -2}, "metrics_port"), ({"grace_s": -0.1}, "grace_s"),
    ({"max_message_bytes": 0}, "max_message_bytes"), ({"log_format": "xml"}, "log_format"),
    ({"span_file_max_bytes": -1}, "span_file_max_bytes"), ({"span_file_backups": -1}, "span_file_backups"),
])
def test_server_config_validation(kwargs, field_name):
    with pytest.raises(FieldError, match=f"^{field_name}: ") as err:
        ServerConfig(**kwargs)
    assert err.value.field == field_name


def test_server_config_span_file():
    assert ServerConfig(run_dir="r").span_file("npu", 42) == "r/spans/npu-42.jsonl"
    assert ServerConfig(trace_file="t.jsonl").span_file("npu", 42) == "t.jsonl"
    assert ServerConfig(otlp_endpoint="localhost:4317").span_file("npu", 42) == "runs/local/spans/npu-42.jsonl"
    assert ServerConfig(otlp_endpoint="localhost:4317", span_files=False).span_file("npu", 42) is None
