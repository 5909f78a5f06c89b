import flame_asgi


def test_public_surface_is_pinned() -> None:
    assert flame_asgi.__all__ == sorted(flame_asgi.__all__)
    contract = {"FastAPI", "FlamePool", "flame_pool", "parent", "report", "LocalBackend", "ProcessBackend",
                "DockerBackend", "KubernetesBackend", "FlyBackend", "FlameError", "BootError", "CallTimeout",
                "RunnerLost", "RemoteError"}
    assert contract <= set(flame_asgi.__all__)
    for name in flame_asgi.__all__:
        assert getattr(flame_asgi, name) is not None


def test_exception_tree() -> None:
    for name in ("BootError", "CallTimeout", "RunnerLost", "RemoteError", "SerializationError", "PayloadTooLarge",
                 "ProtocolError", "PoolClosed", "VersionSkew"):
        assert issubclass(getattr(flame_asgi, name), flame_asgi.FlameError)
    assert issubclass(flame_asgi.CallTimeout, TimeoutError)
