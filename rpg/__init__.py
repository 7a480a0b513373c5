"""KL-regularized policy-gradient RL for language models."""
