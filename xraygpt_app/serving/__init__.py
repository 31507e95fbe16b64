"""Serving the LLM out of process: a vLLM server (launched and watched, or at a URL) fed prompt embeddings.

``config`` holds the ``llm_server:`` settings, ``server`` launches and watches the server, ``remote``
is the chat engine's token source that keeps only the embedding matrix in the app.
"""
