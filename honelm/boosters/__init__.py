"""Boosters transform a model or wrap an objective (LoRA, adversarial training); wired in one place."""
