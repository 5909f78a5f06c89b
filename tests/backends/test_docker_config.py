"""The Docker backend's pure half: create requests, exits, addresses (no dockerd needed)."""

from __future__ import annotations

import pytest

from flame_asgi.backends._docker_config import (
    container_config,
    container_id_in,
    container_name,
    describe_exit,
    parse_memory,
    published_url,
)


def test_a_runner_container_is_a_removed_limited_loopback_container() -> None:
    config = container_config(image="app:1", command=["python", "-m", "uvicorn"], env={"A": "1"}, port=8000,
                              labels={"l": "v"}, network=None, host_ip="127.0.0.1", binds=["/x:/x:ro"], init=True,
                              cpus=1.5, memory=256 << 20, working_dir="/srv", host_config={"ShmSize": 1 << 20})
    hc = config["HostConfig"]
    assert hc["AutoRemove"] and hc["Init"] and hc["Binds"] == ["/x:/x:ro"]
    assert hc["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert hc["NanoCpus"] == 1_500_000_000 and hc["Memory"] == hc["MemorySwap"] == 256 << 20  # no swap
    assert hc["ShmSize"] == 1 << 20 and config["WorkingDir"] == "/srv" and config["Env"] == ["A=1"]
    host = container_config(image="app:1", command=[], env={}, port=9000, labels={}, network="host",
                            host_ip="127.0.0.1", binds=[], init=False, cpus=None, memory=None, working_dir=None,
                            host_config={})
    assert "PortBindings" not in host["HostConfig"] and host["HostConfig"]["NetworkMode"] == "host"


def test_how_a_container_ended() -> None:
    assert describe_exit("c", 137, oom=True, memory=64 << 20).kind == "oom"
    assert str(describe_exit("c", 137, oom=True, memory=64 << 20)) == (
        "container c was killed: out of memory (OOMKilled, memory limit of 64 MiB)")
    killed = describe_exit("c", 137, oom=False, memory=None)
    assert (killed.kind, killed.signal, str(killed)) == ("signal", "SIGKILL",
                                                         "container c was killed by SIGKILL (exit code 137)")
    assert (describe_exit("c", 3, oom=False, memory=None).kind, describe_exit("c", 3, oom=False, memory=None).code) \
        == ("exit", 3)
    assert describe_exit("c", None, oom=False, memory=None).kind == "gone"


def test_where_the_runner_is_reached() -> None:
    settings = {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}]},
                "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}
    assert published_url(settings, 8000, host_ip="127.0.0.1", network=None) == "http://127.0.0.1:32768"
    assert published_url(settings, 8000, host_ip="0.0.0.0", network=None) == "http://127.0.0.1:32768"
    assert published_url(settings, 8000, host_ip=None, network=None) == "http://172.17.0.2:8000"
    assert published_url({"Ports": {}}, 8000, host_ip="127.0.0.1", network=None) is None


def test_small_parsers() -> None:
    assert parse_memory("512m") == 512 << 20 and parse_memory("1GiB") == 1 << 30 and parse_memory(4096) == 4096
    with pytest.raises(ValueError, match="use bytes or a size"):
        parse_memory("lots")
    assert container_name("pool-1/x") == "flame-pool-1-x"
    cid = "a" * 64
    assert container_id_in(f"0::/system.slice/docker-{cid}.scope") == cid
    assert container_id_in(f"1 2 0:1 /var/lib/docker/containers/{cid}/hostname /etc/hostname") == cid
    assert container_id_in("0::/init.scope") is None
