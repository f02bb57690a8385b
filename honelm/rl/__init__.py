"""Reinforcement learning from rewards: advantage maths (`advantages`), rollouts that feed PPO
minibatches to the one training loop (`rollout`), the policy-with-value model (`policy`) and the
rewards a rollout is scored with (`rewards`)."""
