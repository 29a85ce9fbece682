"""Semi-LLIE: semi-supervised low-light image enhancement (mean teacher + Mamba backbone).

Nothing heavy is imported here: `import semi_llie` stays cheap and never touches CUDA-only modules.
"""

__version__ = "0.1.0"
