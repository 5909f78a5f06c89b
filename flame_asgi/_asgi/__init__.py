"""The ASGI layer: pools on a Starlette or FastAPI app, and what routes use of them.

``extension`` registers pools and runs them in the app's lifespan, ``app`` is the
``FastAPI`` subclass with ``add_flame_pool``, ``dependencies`` the ``Depends`` helpers,
``relay`` live progress over a WebSocket, ``pool_view_page`` the pool view's HTML.
"""
