"""Scaling out: corpus compression with Ray Data (``corpus``) and generation through vLLM (``vllm``).

Nothing is imported here: Ray, pyarrow and httpx are optional and are imported inside the functions that need them.
Multi-process training is ``accelerate launch -m commer train CONFIG`` (see ``commer.train``); ``docs/scaling.md``
says how to run each on a cluster.
"""
