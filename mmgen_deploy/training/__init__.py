"""Training: the VQ-VAE (stage 1) and the DiT on its cached latents (stage 2)."""

from mmgen_deploy.training.recipes import TrainRecipe, prepare_run, recipe_for

__all__ = ["TrainRecipe", "prepare_run", "recipe_for"]
