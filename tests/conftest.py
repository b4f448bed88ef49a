"""Fixtures every test module can use without importing them: the real servers the tests run
against (redis-server, SeaweedFS's S3) and `influence serve` as its own process."""

pytest_plugins = ["tests.support.servers.redis", "tests.support.servers.s3", "tests.support.servers.influence"]
