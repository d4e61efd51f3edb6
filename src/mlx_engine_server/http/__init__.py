"""The HTTP front: app, guards, errors, bodies, SSE, access log, metrics, ops routes."""
