"""The runner layer: what runs inside a runner (the app copy a parent booted).

``host`` serves the signed ``/_flame`` endpoints and refuses everyone but the parent;
``session`` runs one parent's channel; ``work`` one piece of work; ``progress`` is
``report``/``receive``; ``threads`` the elastic pool sync functions run in.
"""
