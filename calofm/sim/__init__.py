"""Built-in parametrised (GFlash-style) electromagnetic shower simulator for any geometry card."""

from calofm.sim.run import Run, sample_conditions, simulate, simulate_to_file
from calofm.sim.shower import ShowerSimulator, SimOptions

__all__ = ["Run", "ShowerSimulator", "SimOptions", "sample_conditions", "simulate", "simulate_to_file"]
