"""ServerSettings: the service's configuration at the server edge (pydantic-settings).

Sources, strongest first: keyword arguments (the `kvfuse serve` flags), environment variables
`KVFUSE_<FIELD>` (e.g. `KVFUSE_REDIS_URL`, `KVFUSE_API_KEY`), a TOML file named by `config=` or
`$KVFUSE_CONFIG` (top-level keys are the field names), then the defaults below. Byte sizes accept ints or
strings such as "512MiB", "4GiB", "1.5GB". Inside the library everything is a dataclass: `store_config()`
turns these settings into the TieredStore's StoreConfig.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engine.paths import kvfuse_home
from kvstore.config import StoreConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> Any:
    """'4GiB' -> 4294967296; ints pass through; anything else is left for pydantic to reject."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{value!r} is not a byte size (examples: 1048576, '512MiB', '4GiB', '2GB')")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
_STORE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(StoreConfig)}


class ServerSettings(BaseSettings):
    """Everything `kvfuse serve` reads. See the README's "Server" section for each field."""

    model_config = SettingsConfigDict(env_prefix="KVFUSE_", extra="forbid", validate_assignment=True)

    # fields an operator may change on a running server (PATCH /v1/admin/config)
    LIVE_FIELDS: ClassVar[frozenset[str]] = frozenset({"max_body_bytes", "write_through", "redis_retry_s"})

    config: Path | None = None  # the TOML file these settings were read from (if any)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    lm_port: int | None = Field(None, ge=0, le=65535)  # LMCache lm:// listener; None: off
    # lm:// has no authentication, so it stays on loopback unless told otherwise, whatever `host` is
    lm_host: str = "127.0.0.1"
    api_key: SecretStr | None = None
    # at least 64 KiB: a smaller limit would refuse the admin call that raises it again
    max_body_bytes: Annotated[Size, Field(ge=64 << 10)] = 256 << 20
    # large bodies read straight into their buffer by our uvicorn protocol; off: uvicorn's own path
    bulk_bodies: bool = True
    log_level: str = "info"
    host_bytes: Size = _STORE_DEFAULTS["host_bytes"]
    host_prefault: bool = _STORE_DEFAULTS["host_prefault"]  # touch the host pool at start
    # clients choose entry sizes: tiny ones are charged 4 KiB (see StoreConfig.host_min_entry_bytes)
    host_min_entry_bytes: Size = 4096
    disk_path: Path | None = None  # default: $KVFUSE_HOME/store
    disk_bytes: Size = _STORE_DEFAULTS["disk_bytes"]  # 0: no disk tier
    disk_fsync: bool = _STORE_DEFAULTS["disk_fsync"]
    redis_url: str | None = None
    redis_bytes: Size = _STORE_DEFAULTS["redis_bytes"]
    redis_prefix: str = _STORE_DEFAULTS["redis_prefix"]
    redis_ttl_s: int | None = Field(None, gt=0)
    redis_timeout_s: float = Field(_STORE_DEFAULTS["redis_timeout_s"], gt=0)
    redis_retry_s: float = Field(_STORE_DEFAULTS["redis_retry_s"], gt=0)
    write_behind: bool = _STORE_DEFAULTS["write_behind"]
    write_queue: int = Field(_STORE_DEFAULTS["write_queue"], ge=1)
    write_through: bool = _STORE_DEFAULTS["write_through"]

    @field_validator("api_key", "redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # `KVFUSE_REDIS_URL=` switches Redis off

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = init_settings.init_kwargs.get("config") or os.environ.get("KVFUSE_CONFIG")  # type: ignore[attr-defined]
        sources = [init_settings, env_settings]
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    def resolved_disk_path(self) -> Path | None:
        if self.disk_bytes == 0:
            return None
        return self.disk_path if self.disk_path is not None else kvfuse_home() / "store"

    def store_config(self) -> StoreConfig:
        disk = self.resolved_disk_path()
        return StoreConfig(
            host_bytes=self.host_bytes,
            host_prefault=self.host_prefault,
            host_min_entry_bytes=self.host_min_entry_bytes,
            disk_path=None if disk is None else str(disk),
            disk_bytes=self.disk_bytes,
            disk_fsync=self.disk_fsync,
            redis_url=self.redis_url,
            redis_bytes=self.redis_bytes,
            redis_prefix=self.redis_prefix,
            redis_ttl_s=self.redis_ttl_s,
            redis_timeout_s=self.redis_timeout_s,
            redis_retry_s=self.redis_retry_s,
            write_behind=self.write_behind,
            write_queue=self.write_queue,
            write_through=self.write_through,
        )

    def public(self) -> dict[str, Any]:
        """The settings as JSON-able values, the API key redacted (for GET /v1/admin/config)."""
        out = self.model_dump(mode="json")
        out["api_key"] = None if self.api_key is None else "***"
        out["disk_path"] = None if self.resolved_disk_path() is None else str(self.resolved_disk_path())
        return out
