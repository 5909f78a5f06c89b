"""The pool layer: ``FlamePool`` and the parts it is a facade over.

``config`` (the options, checked and frozen) → ``state`` (scaling decisions, no I/O) →
``runners`` (boot, stop, reap, hooks; the only owner of the state) → ``slots`` (a
caller's wait for room) → ``dispatch`` (how work runs) → ``lease`` (``FlameRunner``) →
``pool`` (the facade). ``stream``, ``child`` and ``map`` are what calls hand back.
"""
