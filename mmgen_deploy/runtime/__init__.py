"""Interchangeable backends behind one `Runner` interface."""

from mmgen_deploy.runtime.base import BACKENDS, PRECISIONS, Runner, check_feeds

__all__ = ["BACKENDS", "PRECISIONS", "Runner", "check_feeds"]
