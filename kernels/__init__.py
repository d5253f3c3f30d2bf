"""GPU kernels of edet-deploy and the builders of their PTX and launch parameters (no TensorRT needed)."""
