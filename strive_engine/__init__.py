"""strive_engine: STRIVE video-RL training for video-language models.

Entry points: `torchrun -m strive_engine.train`, `python -m strive_engine.evaluate`,
`python -m strive_engine.synthetic`. Kernels live in the separate package `strive_kernels`.
"""

__version__ = "0.1.0"
