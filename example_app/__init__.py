"""The flame_asgi example app: CPU-heavy work offloaded to runner processes."""
