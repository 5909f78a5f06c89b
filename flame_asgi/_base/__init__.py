"""The base layer: what every other layer may use, and which uses nothing of flame_asgi.

Exceptions (the one tree users catch), settings (every environment variable), the
parent's view of itself (``runner_mode``, ``ParentInfo``, the code version), the channel
secret and the names of functions as events and errors spell them.
"""
