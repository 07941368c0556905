"""Serving: the Ray Serve app, its page, and the local Ray cluster.

Ray reads RAY_AUTH_MODE once, when it is first imported, so it is defaulted here, before any module
of this package imports Ray: token authentication stays on (the token is ~/.ray/auth_token, or
RAY_AUTH_TOKEN for a remote cluster). Set RAY_AUTH_MODE=disabled only for a cluster without it.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
