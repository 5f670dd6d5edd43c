"""steerwise: activation steering for generative models.

Where (sites) x how (maps) x when (gates): see README.md.
"""

__version__ = "0.1.0"
