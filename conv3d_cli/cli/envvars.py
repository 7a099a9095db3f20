"""Options whose default comes from an environment variable (``CONV3D_WORKERS=8``).

On a cluster or batch system the job script, not each command line, knows the
cores and memory a job was given: ``export CONV3D_WORKERS=$SLURM_CPUS_PER_TASK``
sets the default, and an option on the command line still wins. A value taken
from the environment that is not valid names the variable, since the command
line the user looks at does not show it.
"""

from __future__ import annotations

import click
from click.core import ParameterSource


class EnvOption(click.Option):
    """A click option read from ``envvar`` when not given; ``--help`` shows the
    variable (``show_envvar``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)

    def get_error_hint(self, ctx):
        """``CONV3D_WORKERS=abc (the default of --workers)`` for a value from the
        environment, else the option's name alone."""
        names = " / ".join(f"'{opt}'" for opt in self.opts)
        if ctx is not None and ctx.get_parameter_source(self.name) == ParameterSource.ENVIRONMENT:
            value = self.resolve_envvar_value(ctx)
            return f"{self.envvar}={value} (the default of {names})"
        return names
