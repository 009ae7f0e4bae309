"""micle-tf: SimCLR and MICLe (Azizi et al., ICCV 2021) in Keras 3 / TensorFlow."""
__version__ = "0.1.0"
