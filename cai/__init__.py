"""cai: Constitutional AI / RLAIF data generation, AI feedback labelling, reward-model and PPO training."""

__version__ = "0.1.0"
