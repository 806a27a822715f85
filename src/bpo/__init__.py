"""bpo: Bootstrapped Preference Optimization for multimodal LLMs."""

__version__ = "0.1.0"
