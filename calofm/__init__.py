"""calofm: a foundation model for calorimeter shower simulation.

Data -> geometry -> simulator -> model -> diffusion -> training -> sampling -> evaluation -> hub.
"""

__version__ = "0.1.0"
