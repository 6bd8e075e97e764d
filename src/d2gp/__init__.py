"""d2gp: Deep Distillation Gradient Preconditioning for plug-and-play FISTA."""

__version__ = "0.1.0"
