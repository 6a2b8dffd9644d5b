"""The Ray backend: Ray Train workers on a Ray cluster (``backend``), the cluster itself (``cluster``),
the train core inside every worker (``workers``), and a submitted Ray Job's entry point (``__main__``).

Picked by name through :func:`launcher.backends.get_backend`; nothing else imports it.
"""
