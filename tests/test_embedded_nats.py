"""The embedded nats-server starts on loopback with credentials and refuses old versions."""

import pytest

from numerusd.embedded_nats import check_version
from numerusd.errors import NatsUnavailable


async def test_server_binds_loopback_with_private_credentials(nats_server):
    import nats

    assert nats_server.url.startswith("nats://127.0.0.1:")
    conf = nats_server.store_dir / "nats-server.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert nats_server.password in conf.read_text()
    client = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    assert client.is_connected
    assert client.connected_server_version.major == 2
    await client.close()


def test_old_server_refused_with_clear_message():
    with pytest.raises(NatsUnavailable, match=r"2\.9\.0 is too old: numerusd needs 2\.10\.0"):
        check_version("nats-server: v2.9.0")
    check_version("nats-server: v2.15.1")
