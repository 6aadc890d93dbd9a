"""Sampling: NumPy schedulers and one loop over any `Runner` backend."""

from mmgen_deploy.sampling.loop import SampleResult, sample, to_uint8
from mmgen_deploy.sampling.schedulers import SAMPLERS, Scheduler, make_scheduler, respaced_timesteps

__all__ = ["SAMPLERS", "SampleResult", "Scheduler", "make_scheduler", "respaced_timesteps", "sample", "to_uint8"]
