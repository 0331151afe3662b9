"""Samplers: token generation with a KV cache, prefix sharing for tree rollouts; `backend`
builds them for the engine `rollout.backend` names."""
from aepo.rollout.sampler.backend import BACKENDS, SamplerBackend, TorchBackend, build_backend
from aepo.rollout.sampler.torch_sampler import TorchSampler, supports_lean_forward

__all__ = ["BACKENDS", "SamplerBackend", "TorchBackend", "TorchSampler", "build_backend",
           "supports_lean_forward"]
