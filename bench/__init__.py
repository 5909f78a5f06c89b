"""flame_asgi benchmarks: ``python -m bench [--quick] [--out DIR]`` (see docs/performance.md).

One module per family, each returning plain dicts: ``floors`` (the transports under a
call), ``latency``, ``throughput``, ``cold``, ``scaleout``, ``payload``, ``burst``,
``container`` (DockerBackend beside ``docker run``), ``streams`` (Upload / RemoteBytes),
``pool_sim`` (the pool's bookkeeping at scale) and ``memory``; ``peers`` runs Ray
(``peer_ray``) and Dask (``peer_dask``) in their own interpreters. ``run`` drives them
one after another; ``report``, ``markdown`` and ``plot`` write the JSON, the tables and
the PNG. What runners execute lives in ``tasks``; ``python -m bench.profile`` shows
where a call's time goes.
"""
