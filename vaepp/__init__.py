"""VAEPP: Variational Autoencoder with a Pull-back Prior — a reference reproduction.

The library never reads params.yaml, argv, the environment or MLflow (that is `tracking/`'s);
functions take explicit arguments and return tensors and dicts.
"""

__version__ = "0.1.0"
