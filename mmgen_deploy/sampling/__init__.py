"""Sampling: NumPy schedulers and one loop over any `Runner` backend."""

from mmgen_deploy.numerics import to_uint8
from mmgen_deploy.sampling.conditioning import (
    Conditioning,
    class_conditioning,
    make_conditioning,
    text_conditioning,
)
from mmgen_deploy.sampling.loop import SampleResult, sample
from mmgen_deploy.sampling.schedulers import SAMPLERS, Scheduler, make_scheduler, respaced_timesteps

__all__ = [
    "SAMPLERS",
    "Conditioning",
    "SampleResult",
    "Scheduler",
    "class_conditioning",
    "make_conditioning",
    "make_scheduler",
    "respaced_timesteps",
    "sample",
    "text_conditioning",
    "to_uint8",
]
