"""Kafka's security settings reach every client: librdkafka's config (producers, consumers,
admin) and Faust's aiokafka credentials; a half-configured one fails at start."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import ConfigError
from kernel.settings import load_settings
from streams.app import broker_credentials
from streams.kafka_clients import consumer_config, producer_config, security_config
from streams.topic_admin import make_admin


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throw-away certificate and its key (openssl is on every machine of this kind)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def test_the_local_default_is_plaintext_everywhere() -> None:
    settings = load_settings()
    assert security_config(settings) == {"security.protocol": "PLAINTEXT"}
    assert producer_config(settings)["security.protocol"] == "PLAINTEXT"
    assert consumer_config(settings, "g")["security.protocol"] == "PLAINTEXT"
    assert broker_credentials(settings) is None


def test_sasl_ssl_reaches_every_client(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    settings = load_settings(kafka={
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "proxy", "sasl_password": "s3cret", "ssl_ca_file": str(cert),
        "ssl_certificate_file": str(cert), "ssl_key_file": str(key),
    })  # fmt: skip
    expected = {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "proxy", "sasl.password": "s3cret", "ssl.ca.location": str(cert),
        "ssl.certificate.location": str(cert), "ssl.key.location": str(key),
        "ssl.endpoint.identification.algorithm": "https",
    }  # fmt: skip
    assert security_config(settings) == expected
    for config in (producer_config(settings), consumer_config(settings, "g")):
        assert expected.items() <= config.items()
    make_admin(settings)  # librdkafka accepts the combination (it refuses unknown keys)
    credentials: Any = broker_credentials(settings)  # faust's SASLCredentials
    assert credentials is not None
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-256"
    assert credentials.username == "proxy" and credentials.password == "s3cret"
    assert credentials.ssl_context.check_hostname
    assert "s3cret" not in repr(settings.kafka)  # a secret in the settings model


def test_ssl_alone_and_no_hostname_check(pem: tuple[Path, Path]) -> None:
    cert, _ = pem
    settings = load_settings(kafka={"security_protocol": "SSL", "ssl_ca_file": str(cert),
                                    "ssl_check_hostname": False})  # fmt: skip
    config = security_config(settings)
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert "sasl.username" not in config
    credentials: Any = broker_credentials(settings)  # faust's SSLCredentials
    assert credentials is not None and credentials.protocol.value == "SSL"
    assert not credentials.context.check_hostname


@pytest.mark.parametrize(("kafka", "names"), [
    ({"security_protocol": "SASL_SSL"}, "kafka.sasl_username and kafka.sasl_password"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"}, "kafka.sasl_password"),
    ({"ssl_key_file": "/etc/hostname"}, "kafka.ssl_certificate_file and kafka.ssl_key_file"),
    ({"security_protocol": "SSL", "ssl_ca_file": "/no/such/ca.pem"}, "kafka.ssl_ca_file"),
])  # fmt: skip
def test_a_half_configured_security_fails_at_start_naming_the_setting(
    kafka: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka=kafka)
    assert names in str(caught.value)
