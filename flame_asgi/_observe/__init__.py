"""The observability layer: events, spans, runner logs and what the pool view remembers.

It sees pools only through the names and numbers they report, never their classes.
"""
