"""The HTTP server's parts: the batching thread, request schemas, media from content parts, metrics, the app."""
