"""The wire layer: how a parent and a runner talk, one signed frame at a time.

Frames and their kinds (``protocol``), the channels they travel on (``channel``), their
sealing and opening (``codec``, ``keys``), shared memory for large frames (``shm``), the
batching writer, pickling that registers transfers, the transfers themselves and the
parent's end of one runner's channel (``connection``). It knows nothing of pools.
"""
