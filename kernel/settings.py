"""One typed settings model for every process of the project.

Values come, highest priority first, from: keyword arguments, the three
conventional connection variables (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``,
``REDIS_URL``, which also mark that service as external so the stack launcher
starts nothing for it), ``CREDITLEDGER_*`` environment variables (nested with
``__``, e.g. ``CREDITLEDGER_KAFKA__CLIENT_ID``), a YAML file named by
``CREDITLEDGER_CONFIG``, and the defaults below.

``config.example.yaml`` is generated from this model (``creditledger config
example``) and a unit test fails when the two drift, so every field needs a
``description``: it becomes the comment above the line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from kernel.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The store's development secrets start with this; `store serve` refuses them off loopback.
DEV_SECRET_PREFIX = "dev-only"

# Conventional variables that point the whole project at services someone else runs.
EXTERNAL_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "DATABASE_URL": ("postgres", "url"),
    "REDIS_URL": ("redis", "url"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers, host:port[,host:port]."
    )
    external: bool = Field(
        False, description="True when Kafka is run by someone else: the launcher starts nothing."
    )
    client_id: str = Field("creditledger", description="Client id prefix sent to the broker.")
    request_timeout_ms: int = Field(
        30000, ge=1000, description="Admin and producer request timeout, milliseconds."
    )
    delivery_timeout_ms: int = Field(
        120000,
        ge=1000,
        description="How long a producer keeps retrying a message before reporting failure.",
    )
    linger_ms: int = Field(
        5, ge=0, description="Producer batching delay, milliseconds (throughput vs latency)."
    )
    topics_profile: str = Field(
        "local",
        description=(
            "Profile of topics.yaml to apply and check: local (1 replica) or production "
            "(3 replicas, min.insync.replicas 2, for 3 or more brokers)."
        ),
    )
    # Security: passed to every client (producers, consumers, admin, and Faust's aiokafka).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers (the local stack: PLAINTEXT)."
    )
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism, for SASL_PLAINTEXT and SASL_SSL."
    )
    sasl_username: str = Field("", description="SASL user of this process's role.")
    sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (a secret).")
    ssl_ca_file: Path | None = Field(
        None, description="CA certificate(s) that sign the brokers' (PEM); none: the system's."
    )
    ssl_certificate_file: Path | None = Field(
        None, description="Client certificate (PEM), when the brokers ask for one."
    )
    ssl_key_file: Path | None = Field(None, description="The client certificate's key (PEM).")
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )

    @model_validator(mode="after")
    def _security_complete(self) -> KafkaSettings:
        """A half-configured security setting fails at start, naming what is missing."""
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_username and self.sasl_password.get_secret_value()
        ):
            raise ValueError(f"security_protocol {self.security_protocol} needs "
                             "kafka.sasl_username and kafka.sasl_password")  # fmt: skip
        if (self.ssl_certificate_file is None) != (self.ssl_key_file is None):
            raise ValueError("kafka.ssl_certificate_file and kafka.ssl_key_file go together")
        for name in ("ssl_ca_file", "ssl_certificate_file", "ssl_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"kafka.{name}: no file {path}")
        return self


class PostgresSettings(_Section):
    url: SecretStr = Field(
        SecretStr("postgresql://creditledger:creditledger@127.0.0.1:15432/creditledger"),
        description="Postgres connection URL (a secret: it carries the password).",
    )
    external: bool = Field(
        False,
        description="True when Postgres is run by someone else: the launcher starts nothing.",
    )
    connect_timeout_s: int = Field(5, ge=1, description="Connection timeout, seconds.")

    @field_validator("url")
    @classmethod
    def _postgres_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"must start with postgresql://, got scheme {scheme!r}")
        return value


class RedisSettings(_Section):
    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:16379/0"),
        description="Redis connection URL (a secret: it may carry a password).",
    )
    external: bool = Field(
        False, description="True when Redis is run by someone else: the launcher starts nothing."
    )
    socket_timeout_ms: int = Field(500, ge=10, description="Redis socket timeout, milliseconds.")

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {scheme!r}")
        return value


class StackSettings(_Section):
    state_dir: Path = Field(
        Path("/tmp/creditledger-stack"),
        description=(
            "Where the local stack keeps data, logs and PID files (throw-away; outside "
            "any home directory so the unprivileged Postgres user can reach it)."
        ),
    )
    cache_dir: Path = Field(
        Path("~/.cache/creditledger"),
        description="Where downloaded Kafka jars are cached between runs (outside the repo).",
    )
    kafka_version: str = Field(
        "4.1.1", description="Apache Kafka version resolved from Maven Central."
    )
    kafka_controller_port: int = Field(
        19093, ge=1, le=65535, description="KRaft controller listener port (loopback)."
    )
    kafka_brokers: int = Field(
        1,
        ge=1,
        le=9,
        description=(
            "Kafka nodes the launcher runs (combined broker + controller); 3 makes a "
            "replicated cluster, node n listening 100*(n-1) above node 1's ports."
        ),
    )
    kafka_secure: bool = Field(
        False,
        description=(
            "Run Kafka as production does: a SASL_SSL listener, TLS between nodes, SCRAM "
            "users per role and ACLs (certificates and passwords under state_dir/secure)."
        ),
    )
    kafka_heap_mb: int = Field(1024, ge=256, description="Kafka JVM heap per node, MiB.")
    postgres_os_user: str = Field(
        "postgres",
        description="Unprivileged OS user that owns the Postgres cluster when run as root.",
    )
    start_timeout_s: int = Field(
        120, ge=5, description="How long to wait for each service to become ready, seconds."
    )
    stop_timeout_s: int = Field(
        30, ge=1, description="How long to wait for a graceful stop before SIGKILL, seconds."
    )


class LedgerSettings(_Section):
    app_id: str = Field(
        "creditledger-ledger",
        description="Faust app id of the ledger workers (also their consumer group).",
    )
    store: str = Field(
        "rocksdb://",
        description="Faust table store: rocksdb:// (kept across restarts) or memory://.",
    )
    data_dir: Path = Field(
        Path("/tmp/creditledger-worker"),
        description="Where workers keep their RocksDB state; one sub-folder per worker name.",
    )
    max_amount_micro: int = Field(
        1_000_000_000_000,
        ge=1,
        description="Largest amount one command may move, micro-credits (bigger: rejected).",
    )
    batch_max: int = Field(
        2000, ge=1, description="Most commands folded per batch (one producer flush per batch)."
    )
    batch_within_ms: int = Field(
        10, ge=0, description="How long a batch may wait to fill when traffic is light."
    )
    flush_timeout_s: int = Field(
        5,
        ge=1,
        description=(
            "Longest wait for a batch's entries to be acked; past it the worker exits "
            "(kept below session_timeout_ms so a stuck worker never overlaps its successor)."
        ),
    )
    session_timeout_ms: int = Field(
        10000,
        ge=6000,
        description="Consumer group session timeout: how fast a dead worker's "
        "partitions move to the others.",
    )
    commit_interval_ms: int = Field(
        1000, ge=100, description="How often workers commit command offsets."
    )
    snapshot_every_entries: int = Field(
        50_000,
        ge=0,
        description=(
            "Snapshot a ledger partition's fold state to Postgres once it has this many new "
            "entries since its last snapshot (0: never). Bounds what a worker without local "
            "state folds after restoring: this many entries at most, per partition."
        ),
    )
    snapshot_interval_s: int = Field(
        600,
        ge=1,
        description="Also snapshot a partition this long after its last snapshot, when it "
        "has any new entry (a quiet ledger still gets fresh snapshots).",
    )
    snapshot_keep: int = Field(
        2,
        ge=1,
        description="Snapshots kept per partition: a corrupt newest falls back to the next.",
    )
    snapshot_chunk_bytes: int = Field(
        4 << 20, ge=1024, description="Size of the pieces a snapshot is stored in (bytea rows)."
    )
    idempotency_window_days: int = Field(
        35,
        ge=1,
        description=(
            "How long an applied event_id is remembered, by occurred_at. A command older "
            "than this goes to the DLQ as `stale` (never applied blindly); `ledger dlq "
            "redrive` applies it after checking the ledger. Must exceed the command topics' "
            "retention and any outbox, spool or relay delay."
        ),
    )


class ProjectionSettings(_Section):
    ledger_topic: str = Field(
        "credit.ledger.entries", description="The ledger topic the projectors materialise."
    )
    postgres_group: str = Field(
        "creditledger-project-postgres",
        description="Consumer group of the Postgres projector (`creditledger project postgres`).",
    )
    redis_group: str = Field(
        "creditledger-project-redis",
        description="Consumer group of the Redis projector (`creditledger project redis`).",
    )
    redis_key_prefix: str = Field(
        "creditledger",
        description="Prefix of every Redis key the projections write (see ARCHITECTURE.md).",
    )
    batch_max: int = Field(
        5000, ge=1, description="Most ledger entries applied per projector transaction."
    )
    redis_refill: bool = Field(
        True,
        description="A Redis projector that finds no progress in Redis (it restarted empty) "
        "refills the snapshots from the Postgres read model and reads the ledger from the "
        "Postgres progress on; off: it reads the ledger from its start.",
    )
    poll_timeout_ms: int = Field(
        20,
        ge=1,
        description="How long a projector waits for more entries before applying a batch.",
    )
    replay_batch: int = Field(
        20000, ge=100, description="Entries per transaction while `replay` bulk-loads."
    )
    replay_workers: int = Field(
        2,
        ge=1,
        le=32,
        description="Processes that bulk-load partitions in parallel during `replay` "
        "(decoding is the bottleneck; 1 = in this process).",
    )


class OutboxSettings(_Section):
    batch_max: int = Field(
        500, ge=1, description="Most outbox rows one relay sends per transaction."
    )
    poll_interval_ms: int = Field(
        50, ge=1, description="How long an idle relay waits before looking for new rows."
    )
    flush_timeout_s: int = Field(
        10, ge=1, description="Longest wait for Kafka to ack a batch before the relay retries."
    )
    metrics_port: int = Field(
        18091, ge=0, le=65535, description="Port of the relay's Prometheus /metrics (0 = off)."
    )


class ModelAlias(_Section):
    alias: str = Field(description="The model name clients ask for.")
    upstream_base_url: str = Field(
        description="OpenAI-compatible base URL, e.g. https://api.openai.com/v1."
    )
    upstream_model: str = Field(description="The model name sent upstream.")
    upstream_api_key_env: str = Field(
        "", description="Environment variable holding the upstream API key ('' = no key)."
    )
    price_rule: str = Field(description="Id of the price rule that prices this alias.")
    hold_output_tokens: int | None = Field(
        None,
        ge=1,
        description="Output tokens a hold assumes for this alias when the request bounds "
        "none (max_completion_tokens / max_tokens); unset: proxy.hold_output_tokens.",
    )


class ServiceKey(_Section):
    name: str = Field(description="The calling service (appears in logs and metrics).")
    key_sha256: str = Field(
        description="SHA-256 (hex) of the service's API key; `creditledger proxy new-key`."
    )
    scenes: list[str] = Field(description="Scenes this service may bill ('*' = any).")
    may_skip_charge: bool = Field(
        False, description="Whether the service may send X-Billing-Skip-Charge: true."
    )

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hex digits (sha256 of the key)")
        return value


class ProxySettings(_Section):
    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: int = Field(18000, ge=1, le=65535, description="Port the proxy listens on.")
    models: list[ModelAlias] = Field(
        default_factory=list,
        description="Model aliases: [{alias, upstream_base_url, upstream_model, "
        "upstream_api_key_env, price_rule}].",
    )
    services: list[ServiceKey] = Field(
        default_factory=list,
        description="Calling services: [{name, key_sha256, scenes, may_skip_charge}].",
    )
    price_rules_file: Path = Field(
        Path("price_rules.yaml"),
        description="YAML price rules (relative: from the project); merged with the "
        "price_rules table.",
    )
    price_rules_refresh_s: float = Field(
        5.0, gt=0, description="How often the proxy re-reads the price_rules table, seconds."
    )
    upstream_timeout_s: float = Field(
        600.0, gt=0, description="Whole upstream call timeout, seconds (long answers stream)."
    )
    upstream_connect_timeout_s: float = Field(
        5.0, gt=0, description="Upstream connect timeout, seconds."
    )
    upstream_max_retries: int = Field(
        2, ge=0, description="Retries of a failed upstream call (connection errors, 429, 5xx)."
    )
    upstream_transport: Literal["lean", "httpx"] = Field(
        "lean",
        description="HTTP layer under the openai SDK's client: lean (HTTP/1.1 keep-alive on "
        "httptools, the fast path) or httpx (httpx's own pool: HTTP proxies from the "
        "environment, more checks, ~0.4 ms more per call).",
    )
    guard_failure_policy: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When neither Redis nor Postgres can tell a balance: refuse (fail_closed, "
        "HTTP 503) or let the call through (fail_open).",
    )
    hold_output_tokens: int = Field(
        256,
        ge=1,
        description="Output tokens a hold assumes per choice when the request bounds none "
        "and its alias sets none: a typical answer, not the worst case (the charge is "
        "post-paid; the hold only keeps concurrent calls from overspending much).",
    )
    hold_ttl_s: int = Field(
        900,
        ge=10,
        description="A hold (and a settled charge not yet folded) expires after this long, "
        "seconds: the bound on what a crashed proxy keeps blocked.",
    )
    retry_window_s: float = Field(
        600.0,
        gt=0,
        description="A call under an event id served before is a retry (served, charged "
        "once) only with the same fingerprint (user, model alias, scene, body) and within "
        "this long of the first; otherwise 409 event_id_reused, seconds.",
    )
    retry_serves_max: int = Field(
        5,
        ge=1,
        le=100,
        description="How often one event id may be served in all (first "
        "call and retries); more: 409 event_id_reused.",
    )
    event_id_memory_s: float = Field(
        3600.0,
        gt=0,
        description="How long Redis remembers an event id a caller sent, with its "
        "fingerprint (about 150 bytes per call), seconds; keep it >= retry_window_s. "
        "Later, a reused id is still refused when its charge is written (the outbox keeps "
        "every fingerprint), but only after the call ran.",
    )
    spool_dir: Path = Field(
        Path("~/.local/state/creditledger/spool"),
        description="Where the proxy appends charges when Postgres and Kafka are both down; "
        "`outbox relay` drains it (run a relay on every proxy host). Created 0700; both "
        "refuse a folder that another user owns or others may write to.",
    )
    direct_produce_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for Kafka's ack when Postgres is down, seconds."
    )
    producer_name: str = Field(
        "llm-proxy", description="The `producer` field of the charge events."
    )


class StoreSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the credit-store API listens on.")
    port: int = Field(18100, ge=1, le=65535, description="Port of the credit-store API and page.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes, each with its own pools, sharing the port through "
        "SO_REUSEPORT. More than one pays where cores are spare: on 2 cores shared with "
        "Postgres, 2 lift the Redis-only balance read but not the Postgres reads "
        "(./dev bench store --workers 1,2).",
    )
    fast_reads: bool = Field(
        True,
        description="Answer GET balance, consumption and ledger ahead of the framework "
        "(same replies, a fraction of the CPU); off: every request goes through FastAPI.",
    )
    read_batch: int = Field(
        16,
        ge=1,
        le=500,
        description="Most users one consumption or history query reads: requests that wait "
        "together are answered by one query (1: a query per request).",
    )
    read_queries: int = Field(
        4,
        ge=1,
        le=20,
        description="Consumption (per period) or history queries in flight at once, per "
        "worker; requests beyond them wait and form the next batch.",
    )
    token_secret: SecretStr = Field(
        SecretStr(f"{DEV_SECRET_PREFIX}-token-secret-change-me"),
        description="HMAC key of the API's bearer tokens; the default is refused on any "
        "address but loopback.",
    )
    token_ttl_s: int = Field(
        86400, ge=60, description="Lifetime of a token made by `creditledger store token`, s."
    )
    payment_secret: SecretStr = Field(
        SecretStr(f"{DEV_SECRET_PREFIX}-payment-secret-change-me"),
        description="HMAC key the payment provider signs its callbacks with; the default is "
        "refused on any address but loopback.",
    )
    simulated_provider: bool = Field(
        False,
        description="Serve the simulated payment provider (the page's buy button pays "
        "through it): anyone with a token could pay their own orders for free, so it is for "
        "development only and refused on any address but loopback. Off: a real provider "
        "calls `POST /credit-store/orders/{id}/pay`.",
    )
    max_body_bytes: int = Field(
        65536,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest request body, bytes; larger ones get 413 before anything "
        "parses them (the payment callback needs no token).",
    )
    order_ttl_s: int = Field(
        1800, ge=10, description="An unpaid order expires after this long, seconds."
    )
    fulfil_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often paid orders without a grant are swept and fulfilled, seconds "
        "(a crash between payment and fulfilment is repaired here).",
    )
    fulfil_delay_ms: int = Field(
        0,
        ge=0,
        description="Fault injection for tests: pause between recording a payment and "
        "fulfilling it. Leave 0.",
    )
    producer_name: str = Field(
        "credit-store", description="The `producer` field of the grant events."
    )
    event_topics: list[str] = Field(
        ["plaza.events"],
        description="Topics whose events the event reward rules are matched against "
        "(`creditledger store event-rewards`).",
    )
    event_rewards_group: str = Field(
        "creditledger-event-rewards",
        description="Consumer group of `creditledger store event-rewards`.",
    )
    event_rewards_wait_ms: int = Field(
        50, ge=1, le=10_000,
        description="How long event-rewards waits for more events before claiming what it "
        "has (the latency it adds to an import's reward).",
    )  # fmt: skip
    event_rewards_claims: int = Field(
        4, ge=1, le=32,
        description="Claims event-rewards makes at once, for different users (one user's "
        "claims stay in the order of their events); also its Postgres connections.",
    )  # fmt: skip
    plaza_url: str = Field(
        "http://127.0.0.1:18110/plaza/",
        description="Where the store page links to the plan plaza (the token follows in the "
        "URL fragment).",
    )


class PlazaSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the plan plaza's API and page listen on.")
    port: int = Field(18110, ge=1, le=65535, description="Port of the plan plaza's API and page.")
    default_tag: str | None = Field(
        "general",
        description="The tag a plan published without tags gets; null: a plan without tags "
        "is refused (422 tags_required).",
    )
    max_tags: int = Field(8, ge=1, le=32, description="Most tags on one plan.")
    max_tag_chars: int = Field(32, ge=2, le=64, description="Longest tag, characters.")
    topic: str = Field(
        "plaza.events", description="The topic of the plaza's events (keyed by plan id)."
    )
    producer_name: str = Field("plan-plaza", description="The `producer` field of its events.")
    max_body_bytes: int = Field(
        262144, ge=1024, le=16 * 1024 * 1024,
        description="Largest request body, bytes; larger ones get 413 before anything parses them.",
    )  # fmt: skip
    pool_size: int = Field(10, ge=1, le=100, description="Postgres connections per process.")
    fast_reads: bool = Field(
        True,
        description="Answer the list, a plan's detail and a like ahead of the framework "
        "(same replies, a fraction of the CPU); off: every request goes through FastAPI.",
    )
    read_batch: int = Field(
        16, ge=1, le=500,
        description="Most list, detail or like requests one batch answers: requests that wait "
        "together share one set of queries (1: queries per request).",
    )  # fmt: skip
    read_queries: int = Field(
        4, ge=1, le=20,
        description="Batches of each kind in flight at once; requests beyond them wait and "
        "form the next batch.",
    )  # fmt: skip
    store_url: str = Field(
        "http://127.0.0.1:18100/credit-store/",
        description="Where the plaza page links to the credit store (the token follows in the "
        "URL fragment).",
    )

    @field_validator("default_tag", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An environment variable cannot say null: an empty one switches the default off.
        return None if value == "" else value


class SchemaSettings(_Section):
    avro_dir: Path = Field(
        Path("schemas/avro"),
        description="Directory of the Avro contracts (a relative path starts at the project).",
    )


class MetricsSettings(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the workers', projectors' and relay's /metrics, /healthz and "
        "/readyz listen on (0.0.0.0 for a Prometheus on another host).",
    )
    worker_port: int = Field(
        18092, ge=0, le=65535, description="Port of a ledger worker's /metrics (0 = off)."
    )
    postgres_projector_port: int = Field(
        18093, ge=0, le=65535, description="Port of the Postgres projector's /metrics (0 = off)."
    )
    redis_projector_port: int = Field(
        18094, ge=0, le=65535, description="Port of the Redis projector's /metrics (0 = off)."
    )


class Settings(BaseSettings):
    """Every setting of the project; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="CREDITLEDGER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka.")
    postgres: PostgresSettings = Field(default_factory=PostgresSettings, description="Postgres.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis.")
    stack: StackSettings = Field(
        default_factory=StackSettings,
        description="The local stack launcher (creditledger stack up/down).",
    )
    ledger: LedgerSettings = Field(
        default_factory=LedgerSettings,
        description="The ledger fold (Faust workers: creditledger worker).",
    )
    projections: ProjectionSettings = Field(
        default_factory=ProjectionSettings,
        description="Read models: Redis snapshots and Postgres tables (creditledger project).",
    )
    outbox: OutboxSettings = Field(
        default_factory=OutboxSettings,
        description="The transactional outbox and its relay (creditledger outbox relay).",
    )
    proxy: ProxySettings = Field(
        default_factory=ProxySettings,
        description="The LLM proxy (creditledger proxy serve).",
    )
    store: StoreSettings = Field(
        default_factory=StoreSettings,
        description="The credit store: API, page, orders, rewards (creditledger store serve).",
    )
    plaza: PlazaSettings = Field(
        default_factory=PlazaSettings,
        description="The plan plaza: shared plans, likes, imports, comments (creditledger "
        "plaza serve).",
    )
    schemas: SchemaSettings = Field(
        default_factory=SchemaSettings,
        description="Event contracts.",
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings,
        description="Prometheus endpoints of the processes that serve no HTTP of their own.",
    )
    topics_file: Path = Field(
        Path("topics.yaml"),
        description="Topic spec for `creditledger topics apply` (relative: from the project).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get("CREDITLEDGER_CONFIG")
        if config_path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_path))
        return tuple(sources)

    @property
    def postgres_dsn(self) -> str:
        return self.postgres.url.get_secret_value()

    @property
    def redis_url(self) -> str:
        return self.redis.url.get_secret_value()


def project_path(path: Path) -> Path:
    """Resolve a settings path: ``~`` expanded, relative paths taken from the project root."""
    path = path.expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def _external_overrides() -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for env_name, (section, field) in EXTERNAL_ENV.items():
        value = os.environ.get(env_name, "").strip()
        if value:
            overrides.setdefault(section, {}).update({field: value, "external": True})
    return overrides


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; raise :class:`ConfigError` naming every problem.

    A factory rather than a module-level instance, so that nothing is read at
    import time. ``overrides`` take precedence over everything (tests use them).
    pydantic-settings deep-merges its sources, so overriding one field of a
    section keeps the others from the environment or the YAML file.
    """
    config_path = os.environ.get("CREDITLEDGER_CONFIG")
    if config_path and not Path(config_path).is_file():
        raise ConfigError(f"CREDITLEDGER_CONFIG={config_path} does not name a readable file")
    values: dict[str, Any] = _external_overrides()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
