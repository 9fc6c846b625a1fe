"""MUSE: data-free knowledge distillation with multi-resolution data generation (arXiv 2411.17046).

`muse` holds the method and runs in one process; `orchestration/` wires it onto Ray.
"""

__version__ = "0.1.0"
