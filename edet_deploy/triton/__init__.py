"""Triton Inference Server: repository generator, embedded server launcher and client."""
