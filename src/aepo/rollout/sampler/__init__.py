"""Samplers: token generation with a KV cache, prefix sharing for tree rollouts."""
from aepo.rollout.sampler.torch_sampler import TorchSampler, supports_lean_forward

__all__ = ["TorchSampler", "supports_lean_forward"]
