"""The Slurm backend: the generated sbatch script (``script``), submit/status/logs/cancel through
Slurm's CLI (``backend``), and what each node of the job runs (``__main__``).

Picked by name through :func:`launcher.backends.get_backend`; nothing else imports it.
"""
