"""ddep_jax: Decoder Denoising Pretraining (DDeP) for semantic segmentation in JAX/Flax.

Brempong et al., "Decoder Denoising Pretraining for Semantic Segmentation", 2022.
"""

__version__ = "0.1.0"
